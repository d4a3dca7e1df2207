"""OCR reward with the real offline engine (rapidocr + onnxruntime, bundled models) on rendered text."""

import math

import pytest
from PIL import Image

import rewards
from rewards.base import WeightedSum
from rewards.color import COLORS
from rewards.ocr import OCRReward, levenshtein, ocr_score, render_text, target_text


@pytest.fixture(scope="module")
def ocr() -> OCRReward:
    return rewards.build("ocr", engine_options={"threads": 1})  # loads the ONNX models once for the module


@pytest.mark.parametrize("prompt, target", [
    ('a sign that says "Hello World" in neon', "Hello World"),
    ('"OPEN" written on a door, and "CLOSED" below', "OPEN"),  # the first pair only
    ("a poster reading \u201cGRPO rocks\u201d", "GRPO rocks"),  # typographic quotes
    ('a \u201cfirst\u201d then "second"', "first"),  # whichever opening quote comes first
    ('say "a "b" c"', "a "),  # no nesting: the first quote closes at the next one
    ("it's 'single' then \"double\"", "double"),  # single quotes and apostrophes are not quotes
    ('caf\u00e9 "Cr\u00e8me br\u00fbl\u00e9e 5\u20ac"', "Cr\u00e8me br\u00fbl\u00e9e 5\u20ac"),
])
def test_target_is_the_first_double_quoted_text(prompt, target):
    assert target_text(prompt) == target


@pytest.mark.parametrize("prompt, message", [
    ("a sign with no quotes", "no text in double quotes"),
    ('a sign that says "unfinished', "never closes"),
    ('an empty sign ""', "quotes no text"),
    ('a blank sign "   "', "quotes no text"),
])
def test_prompts_without_a_target_are_a_clear_error(prompt, message):
    with pytest.raises(ValueError, match=message):
        target_text(prompt)


def test_score_formula():
    assert levenshtein("kitten", "sitting") == 3
    assert ocr_score("Hello World", "hello world") == 1.0  # case and spaces do not count
    assert ocr_score("SALE: hello world!", "helloworld") == 1.0  # extra text is not penalised
    assert ocr_score("hello worl", "hello world") == pytest.approx(0.9)
    assert ocr_score("hello, world", "hello world") == pytest.approx(0.9)  # punctuation is kept
    assert ocr_score("", "abc") == 0.0
    assert ocr_score("something much longer", "abc") == 0.0  # clipped at len(target)


def test_right_text_scores_high_wrong_text_low(ocr):
    targets = ["HELLO WORLD", "grpo rocks", "Open 24/7", "Tokyo 2026"]
    prompt = 'a sign that says "{}"'
    images = [render_text(t) for t in targets]
    right = ocr.read(images, [prompt.format(t) for t in targets])
    assert [r.score for r in right] == [1.0] * 4 and all(r.exact for r in right), right
    wrong = ocr(images, [prompt.format(t) for t in ["banana", "zebra", "quiet", "HELLO"]], [{}] * 4)
    assert max(wrong) < 0.5, wrong
    # a near miss scores in between, blank and noise score 0
    near, blank = ocr([render_text("HELLO WORLO"), Image.new("RGB", (256, 256), "white")],
                      [prompt.format("HELLO WORLD")] * 2, [{}, {}])
    assert near == pytest.approx(0.9) and blank == 0.0
    # metadata["text"] overrides the prompt, so prompts without quotes can be scored
    assert ocr([images[0]], ["a sign"], [{"text": "hello world"}]) == [1.0]


def test_exact_match_is_stricter_than_a_full_reward(ocr):
    [result] = ocr.read([render_text("BIG SALE TODAY")], ['a banner that says "sale"'])
    assert result.score == 1.0 and not result.exact and "SALE" in result.text


def test_composite_with_ocr_isolates_the_failing_part(ocr):
    composite = WeightedSum({"ocr": (ocr, 1.0), "color": (rewards.build("color"), 0.5)})
    red_text = render_text("STOP", color=COLORS["white"], background=COLORS["red"])
    scores = composite([red_text, red_text], ['a red sign that says "stop"', "a red sign"], [{}, {}])
    assert scores[0] > 1.0  # 1.0 from OCR plus half the red fraction
    assert math.isnan(scores[1])  # no quoted text: OCR cannot score it, so the sample has no total
    assert composite.last_failures == {"ocr": 1, "color": 0}
    assert composite.last_parts["color"][1] > 0.5


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown OCR engine 'paddle'"):
        rewards.build("ocr", engine="paddle")
