"""GenEval rules on synthetic detections (no model): strict correctness as GenEval, dense score in [0, 1]."""

import json
import random

import pytest

from grpo_img.data import load_prompts
from rewards.geneval import (COCO_CLASSES, COLORS, Detection, GenEvalOptions, evaluate_detections,
                             relative_position)
from rewards.geneval_prompts import (GENEVAL_COUNTS, generate_geneval_prompts, load_geneval_metadata,
                                     write_geneval_metadata)


def det(label, score=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(label, score, box, color)


def single(cls="dog"):
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(cls, n):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}]}


def position(a, rel, b):
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]}


def color_attr(a, ca, b, cb):
    return {"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca},
                                             {"class": b, "count": 1, "color": cb}]}


def test_single_object_extra_instances_are_allowed_and_threshold_is_strict():
    assert evaluate_detections(single(), [det("dog")]).correct
    extra = evaluate_detections(single(), [det("dog"), det("dog", 0.8), det("dog", 0.5)])
    assert extra.correct and extra.score == 1.0  # GenEval accepts extras (Flow-GRPO's dense score gives -1 here)
    at_threshold = evaluate_detections(single(), [det("dog", 0.3), det("cat")])
    assert not at_threshold.correct and at_threshold.score == 0.0 and "expected dog>=1, found 0" in at_threshold.reason
    assert evaluate_detections(single(), [det("dog", 0.3001)]).correct


def test_two_objects_one_missing():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert evaluate_detections(meta, [det("dog"), det("cat", 0.4)]).correct
    missing = evaluate_detections(meta, [det("dog"), det("bird")])
    assert not missing.correct and missing.score == 0.5 and "cat" in missing.reason


@pytest.mark.parametrize("scores, correct, dense", [
    ([0.95, 0.95, 0.95], True, 1.0),
    ([0.95, 0.95], False, 2 / 3),                 # one too few
    ([0.95] * 4, False, 2 / 3),                   # one too many: the exclude clause (>= 4) fires
    ([0.95] * 7, False, 0.0),                     # far too many: clipped at 0, never negative
    ([0.95, 0.95, 0.95, 0.85, 0.6, 0.31], True, 1.0),  # scores in (0.3, 0.9] do not count when counting
    ([0.95, 0.95, 0.9], False, 2 / 3),            # 0.9 itself does not pass (strictly greater)
])
def test_counting_is_an_exact_count_at_the_counting_threshold(scores, correct, dense):
    result = evaluate_detections(counting("cup", 3), [det("cup", s) for s in scores])
    assert result.correct is correct
    assert result.score == pytest.approx(dense)


def test_the_counting_threshold_applies_only_to_counting():
    meta = {"tag": "two_object", "include": [{"class": "cup", "count": 1}, {"class": "fork", "count": 1}]}
    assert evaluate_detections(meta, [det("cup", 0.5), det("fork", 0.5)]).correct


def test_at_most_16_objects_per_class_are_kept():
    many = [det("apple", 0.5 + i / 100) for i in range(20)]
    relaxed = GenEvalOptions(counting_threshold=0.3)
    meta = counting("apple", 16)
    assert evaluate_detections(meta, many, relaxed).correct  # 20 detected, 16 kept: the exclude (>= 17) holds
    assert not evaluate_detections(meta, many).correct  # at the real counting threshold 0.9 none is kept
    meta = counting("apple", 17)
    capped = evaluate_detections(meta, many, relaxed)
    assert not capped.correct and "expected apple>=17, found 16" in capped.reason
    assert capped.score == pytest.approx(16 / 17)


def test_colour_uses_the_top_scoring_objects_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert evaluate_detections(meta, [det("car", 0.9, color="red"), det("car", 0.5, color="blue")]).correct
    wrong = evaluate_detections(meta, [det("car", 0.5, color="red"), det("car", 0.9, color="blue")])
    assert not wrong.correct and wrong.score == 0.5 and "expected red car>=1, found 0 red; and 1 blue" in wrong.reason
    with pytest.raises(ValueError, match="has no colour"):
        evaluate_detections(meta, [det("car", 0.9)])


def test_colour_attribution_partial_credit():
    meta = color_attr("car", "red", "bench", "green")
    both = [det("car", color="red"), det("bench", color="green")]
    assert evaluate_detections(meta, both).correct
    one = evaluate_detections(meta, [det("car", color="red"), det("bench", color="white")])
    assert not one.correct and one.score == pytest.approx(0.75)
    swapped = evaluate_detections(meta, [det("car", color="green"), det("bench", color="red")])
    assert not swapped.correct and swapped.score == pytest.approx(0.5)


def test_relative_position_rule():
    left, right = (0, 40, 20, 60), (60, 40, 80, 60)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((40, 0, 60, 20), (40, 60, 60, 80)) == {"above"}  # y points down
    assert relative_position((0, 0, 20, 20), (60, 60, 80, 80)) == {"left of", "above"}  # a diagonal gives both
    assert relative_position((0, 0, 20, 20), (70, 20, 90, 40)) == {"left of"}  # mostly horizontal
    assert relative_position((0, 0, 100, 100), (10, 0, 110, 100)) == set()  # heavy overlap: no relation
    assert relative_position((5, 5, 15, 15), (5, 5, 15, 15)) == set()  # same box: no relation, no division by 0
    # the margin: centres 21 px apart, boxes 100 wide -> shrink by 0.1*(100+100) = 20 -> 1/21 < 0.5: none
    assert relative_position((0, 0, 100, 10), (21, 0, 121, 10)) == set()
    assert relative_position((0, 0, 100, 10), (21, 0, 121, 10), threshold=0.0) == {"left of"}


def test_position_task():
    meta = position("dog", "left of", "cat")  # a dog left of a cat; include[0] is the cat (the target)
    dog, cat = det("dog", box=(0, 40, 20, 60)), det("cat", box=(60, 40, 80, 60))
    assert evaluate_detections(meta, [dog, cat]).correct
    reversed_ = evaluate_detections(meta, [det("dog", box=cat.box), det("cat", box=dog.box)])
    assert not reversed_.correct and reversed_.score == pytest.approx(2 / 3)  # Flow-GRPO gives 0.75
    assert "expected dog left of target, found right of target" in reversed_.reason
    overlap = evaluate_detections(meta, [det("dog", box=(0, 0, 50, 50)), det("cat", box=(10, 0, 60, 50))])
    assert not overlap.correct and overlap.score == pytest.approx(2 / 3)
    no_target = evaluate_detections(meta, [dog])
    assert not no_target.correct and no_target.score == pytest.approx(1 / 3)
    assert "no target for dog to be left of" in no_target.reason
    diagonal = evaluate_detections(meta, [det("dog", box=(0, 0, 20, 20)), det("cat", box=(60, 60, 80, 80))])
    assert diagonal.correct  # "left of" and "above" both hold


def test_position_checks_every_pair():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    cats = [det("cat", box=(60, 0, 80, 20)), det("cat", box=(0, 60, 20, 80))]
    dog = det("dog", box=(30, 0, 50, 20))  # left of the first cat, above (not left of) the second
    result = evaluate_detections(meta, [dog] + cats)
    assert not result.correct and result.score == pytest.approx((1 + 1 + 0.5) / 3)
    assert evaluate_detections(meta, [det("dog", box=(-40, 30, -20, 50))] + cats).correct


def test_target_with_wrong_colour_fails_the_position():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1, "color": "black"},
                                           {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    dets = [det("dog", box=(0, 40, 20, 60)), det("cat", box=(60, 40, 80, 60), color="white")]
    result = evaluate_detections(meta, dets)
    assert not result.correct and "no target for dog" in result.reason
    assert result.score == pytest.approx(3 / 4)  # cat count 1, cat colour 0, dog count 1, geometry 1


def test_metadata_errors_are_clear():
    with pytest.raises(ValueError, match="needs 'tag' and 'include'"):
        evaluate_detections({"include": []}, [])
    with pytest.raises(ValueError, match="colour 'teal'"):
        evaluate_detections({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}]}, [])
    with pytest.raises(ValueError, match="position must be"):
        evaluate_detections({"tag": "position", "include": [{"class": "car", "count": 1,
                                                             "position": ["left of", 0]}]}, [])


def test_dense_score_is_in_range_and_one_exactly_when_correct():
    rng = random.Random(0)
    records = generate_geneval_prompts(seed=1, counts={t: 30 for t in GENEVAL_COUNTS})
    for record in records * 5:
        classes = [req["class"] for req in record["include"]] + [rng.choice(COCO_CLASSES)]
        dets = []
        for _ in range(rng.randint(0, 7)):
            x, y = rng.uniform(0, 90), rng.uniform(0, 90)
            dets.append(det(rng.choice(classes), rng.uniform(0.2, 1.0), (x, y, x + rng.uniform(1, 40),
                                                                          y + rng.uniform(1, 40)),
                            rng.choice(COLORS[:3])))
        result = evaluate_detections(record, dets)
        assert 0.0 <= result.score <= 1.0
        assert (result.score == 1.0) == result.correct, (record, dets, result)


def test_prompt_generator_matches_geneval_split_and_templates(tmp_path):
    records = generate_geneval_prompts()
    assert len(records) == 553
    assert {t: sum(r["tag"] == t for r in records) for t in GENEVAL_COUNTS} == GENEVAL_COUNTS
    assert len({json.dumps(r, sort_keys=True) for r in records}) == 553
    assert records == generate_geneval_prompts(seed=0) and records != generate_geneval_prompts(seed=1)
    assert sorted(r["include"][0]["class"] for r in records if r["tag"] == "single_object") == sorted(COCO_CLASSES)
    by_tag = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    for r in by_tag["counting"]:
        n = r["include"][0]["count"]
        assert n in (2, 3, 4) and r["exclude"] == [{"class": r["include"][0]["class"], "count": n + 1}]
        assert r["prompt"].startswith(f"a photo of {['two', 'three', 'four'][n - 2]} ")
    assert all(r["include"][0]["class"] != "person" for r in by_tag["colors"] + by_tag["color_attr"])
    assert all(r["include"][1]["position"][1] == 0 for r in by_tag["position"])
    cases = {r["prompt"] for r in records}
    assert "a photo of an airplane" in cases and "a photo of a bus" in cases
    assert any(r["prompt"].endswith(" buses") for r in generate_geneval_prompts(
        seed=3, counts={"counting": 240}))  # plural "es" after "s"; 240 = every counting prompt there is
    with pytest.raises(ValueError, match="unknown GenEval task"):
        generate_geneval_prompts(counts={"colours": 3})
    with pytest.raises(ValueError, match=r"\[0, 80\]"):
        generate_geneval_prompts(counts={"single_object": 81})

    path = tmp_path / "geneval.jsonl"
    write_geneval_metadata(records, path)
    assert load_geneval_metadata(path) == records
    # The trainer's prompt loader passes every field but the prompt through to the reward.
    loaded = load_prompts(str(path))
    assert [p.prompt for p in loaded] == [r["prompt"] for r in records]
    assert loaded[300].metadata == {k: v for k, v in records[300].items() if k != "prompt"}
    path.write_text(path.read_text() + '{"tag": "colors", "include": [{"class": "car"}], "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"geneval.jsonl:554: include\[0\] needs 'class' and 'count'"):
        load_geneval_metadata(path)


def test_summary_is_the_unweighted_mean_of_task_scores():
    from rewards.geneval import GenEvalResult, summarize

    metas = [{"tag": "counting"}] * 3 + [{"tag": "colors"}]
    results = [GenEvalResult(c, float(c), "") for c in (True, False, False, True)]
    assert summarize(results, metas) == {"counting": 1 / 3, "colors": 1.0, "overall": 2 / 3}
