"""Evaluation: a run writes its report, task scores and grids; an interrupted run resumes without redoing finished
prompts and ends where an uninterrupted one does; adapters load; training logs eval metrics; the GenEval and OCR
layers follow their protocols."""

import json
import math
import shutil

import pytest
import torch

from grpo_img.data import PromptRecord
from grpo_img.evaluate import build_benchmark, evaluate, load_policy, main, summarize

PROMPTS = [{"prompt": "a red image", "task": "red"}, {"prompt": "a blue image", "task": "blue"},
           {"prompt": "a red apple", "task": "red"}, {"prompt": "a blue car", "task": "blue"}]


@pytest.fixture(scope="module")
def policy():
    return load_policy("janus", {"tiny": True})


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def test_reward_benchmark_reports_task_scores_grids_and_resumes(policy, prompt_file, tmp_path, capsys):
    benchmark = build_benchmark("reward:color", str(prompt_file), {}, None)
    report = evaluate(policy, benchmark, tmp_path / "full", num_images=2, prompts_per_batch=2)
    assert "eval reward:color" in capsys.readouterr().err  # the progress bar
    results = [json.loads(line) for line in (tmp_path / "full" / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    # task score = mean over the task's images; overall = mean of the task scores
    for task in ("red", "blue"):
        values = [m["color"] for r in results if r["task"] == task for m in r["metrics"]]
        assert len(values) == 4 and report["tasks"][task]["color"] == pytest.approx(sum(values) / 4)
    assert report["overall"] == pytest.approx((report["tasks"]["red"]["color"] + report["tasks"]["blue"]["color"]) / 2)
    assert json.loads((tmp_path / "full" / "report.json").read_text()) == report
    assert "| red | 2 |" in (tmp_path / "full" / "report.md").read_text()
    from PIL import Image

    assert Image.open(tmp_path / "full" / "grids" / "red.png").size == (2 * 128, 2 * (128 + 14))

    # interrupted after the first chunk, in the middle of writing the second: only prompts 2 and 3 are redone
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    lines = (tmp_path / "full" / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    sampled = []
    original = policy.sample
    policy.sample = lambda prompts, *args, **kwargs: sampled.append(list(prompts)) or original(prompts, *args,
                                                                                                **kwargs)
    try:
        resumed = evaluate(policy, benchmark, tmp_path / "cut", num_images=2, prompts_per_batch=2)
    finally:
        del policy.sample
    assert sampled == [["a red apple", "a blue car"]]
    assert resumed == report  # the same draws as the uninterrupted run
    assert (tmp_path / "cut" / "results.jsonl").read_text() == "".join(lines)

    # results of another prompt set are refused, not mixed in
    other = build_benchmark("reward:color", str(prompt_file), {}, None)
    other.records = list(reversed(other.records))
    with pytest.raises(ValueError, match="holds the results of another evaluation .prompts_sha256"):
        evaluate(policy, other, tmp_path / "full", num_images=2)
    with pytest.raises(ValueError, match="another evaluation .num_images: 2 -> 4"):
        evaluate(policy, benchmark, tmp_path / "full", num_images=4)


def test_cli_evaluates_with_and_without_an_adapter(policy, prompt_file, tmp_path, capsys):
    import policies

    trained = policies.build("janus", tiny=True)
    trained.add_lora(r=4, alpha=8)
    with torch.no_grad():
        noise = torch.Generator().manual_seed(0)
        for p in sum(trained.trainable_parameters(), []):
            p.add_(torch.randn(p.shape, generator=noise))
    trained.peft_model.save_pretrained(str(tmp_path / "adapter"))

    common = ["--policy", "janus", "--policy-options", '{"tiny": true}', "--benchmark", "reward:color",
              "--prompts", str(prompt_file), "--num-images", "2", "--limit", "1"]
    base = main(common + ["--out", str(tmp_path / "base")])
    tuned = main(common + ["--out", str(tmp_path / "tuned"), "--adapter", str(tmp_path / "adapter")])
    assert "| task | prompts | color |" in capsys.readouterr().out
    assert base["prompts"] == tuned["prompts"] == base["prompts_total"] == 2  # --limit 1: one prompt per task
    assert base["task_prompts"] == {"red": 1, "blue": 1}
    assert (tmp_path / "base" / "images" / "00000_0.png").read_bytes() != \
        (tmp_path / "tuned" / "images" / "00000_0.png").read_bytes()
    # the same --out with another adapter would report the old score: refused, naming the difference
    with pytest.raises(ValueError, match="another evaluation .adapter_sha256: None -> '[0-9a-f]{64}'"):
        main(common + ["--out", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")])
    again = main(common + ["--out", str(tmp_path / "tuned"), "--adapter", str(tmp_path / "adapter")])
    assert again["image_means"] == tuned["image_means"]  # the same evaluation resumes (nothing left to do)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        main(common + ["--out", str(tmp_path / "x"), "--adapter", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown benchmark"):
        main(common + ["--out", str(tmp_path / "x"), "--benchmark", "hpsv9"])


def test_training_logs_held_out_evaluation(tmp_path):
    from conftest import run_tiny_grpo

    metrics = run_tiny_grpo(tmp_path, "janus", {"tiny": True}, steps=3, eval_prompts=PROMPTS, eval_steps=2,
                            eval_num_images=2)
    assert "eval/color" not in metrics[0]
    for m in (metrics[1], metrics[2]):  # every eval_steps, and after the last step
        assert 0.0 <= m["eval/color"] <= 1.0
        assert m["eval/color"] == pytest.approx((m["eval/red/color"] + m["eval/blue/color"]) / 2)


def test_geneval_layer_follows_the_protocol(policy):
    geneval = pytest.importorskip("rewards.geneval")
    from grpo_img.evaluate import GENEVAL_TASKS, geneval_benchmark

    class EveryOtherImage:
        """A stand-in judge (no detector needed): correct on even images. The layer must turn its results into
        GenEval's task and overall scores."""

        def __init__(self):
            self.count = 0

        def evaluate(self, images, metadata):
            results = []
            for _ in images:
                results.append(geneval.GenEvalResult(correct=self.count % 2 == 0, score=0.5, reason="test"))
                self.count += 1
            return results

    full = geneval_benchmark(evaluator=EveryOtherImage())
    assert len(full.records) == 553
    assert {r.metadata["tag"] for r in full.records} == set(GENEVAL_TASKS)
    picked = [next(r for r in full.records if r.metadata["tag"] == tag) for tag in GENEVAL_TASKS]
    benchmark = geneval_benchmark(picked, evaluator=EveryOtherImage())
    report = evaluate(policy, benchmark, None, num_images=2, prompts_per_batch=6, progress=False)
    assert report["tasks"].keys() == set(GENEVAL_TASKS)
    assert all(means["correct"] == 0.5 for means in report["tasks"].values())
    assert report["overall"] == pytest.approx(0.5)
    # unweighted mean of task means, not of images
    results = [{"task": "counting", "metrics": [{"correct": 1.0}] * 4},
               {"task": "position", "metrics": [{"correct": 0.0}]}]
    assert summarize(results, benchmark, 4)["overall"] == pytest.approx(0.5)


def test_ocr_layer_reports_mean_reward_and_exact_matches():
    ocr = pytest.importorskip("rewards.ocr")
    from grpo_img.evaluate import ocr_benchmark, ocr_prompts

    prompts = ocr_prompts(100)
    assert len({r.prompt for r in prompts}) == 100
    assert all(ocr.target_text(r.prompt) == r.metadata["text"] for r in prompts)
    records = [PromptRecord('a sign that says "OPEN"', {"task": "one_word"}),
               PromptRecord('a sign that says "EXIT"', {"task": "one_word"})]
    benchmark = ocr_benchmark(records)
    images = [ocr.render_text("OPEN"), ocr.render_text("")]
    metrics = benchmark.scorer(images, records)
    assert metrics[0]["exact"] == 1.0 and metrics[0]["ocr"] == 1.0
    assert metrics[1]["exact"] == 0.0 and metrics[1]["ocr"] == 0.0
    report = summarize([{"task": "one_word", "metrics": metrics}], benchmark, 2)
    assert report["overall"] == pytest.approx(0.5) and report["image_means"]["exact"] == pytest.approx(0.5)
    assert not math.isnan(report["overall"])


def test_the_progress_bars_running_score_skips_unscored_images():
    from grpo_img.evaluate import running_mean

    results = [{"metrics": [{"correct": 1.0}, {"correct": float("nan")}]}, {"metrics": [{"correct": 0.0}, {}]}]
    assert running_mean(results, "correct") == 0.5
    assert math.isnan(running_mean([], "correct"))
