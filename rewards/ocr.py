"""OCR reward for text rendering, after Flow-GRPO's `flow_grpo/ocr.py`.

Release facts relied on (shared/notes/rewards.md §4):
- Target: the text inside the first pair of double quotes of the prompt.
- rec = the recognised strings joined ("" if none); rec and target are lower-cased and all spaces removed;
  punctuation is kept.
- d = 0 if target is a substring of rec, else Levenshtein(rec, target); d = min(d, len(target));
  reward = 1 - d / len(target). Extra text in the image is not penalised.
Deliberate deviations:
- Engine: rapidocr 3.x + onnxruntime with the models bundled in its wheel (PP-OCRv6 small), fully offline, instead
  of PaddleOCR 2.9.1 (downloads its models). Flow-GRPO keeps strings with confidence > 0, i.e. all; so do we.
  The engine is pluggable: anything with `read(images) -> list[str]`.
- Flow-GRPO turns any exception (no quotes, engine error) into reward 0. Here a prompt without a quoted target
  raises, so the trainer leaves that sample unscored instead of teaching "0" for an unanswerable prompt.
  `metadata["text"]` (when given) overrides the prompt's quotes.
- Quotes: straight "..." and typographic “...” both count; the first opening quote wins and ends at its matching
  closing quote, so nesting is not understood: `say "a "b" c"` targets `a `.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards.base import Reward

QUOTE_PAIRS = {'"': '"', "\u201c": "\u201d"}  # straight, and typographic “ ”


def target_text(prompt: str) -> str:
    """The text inside the first pair of double quotes; ValueError when there is none or it is empty."""
    openings = [(prompt.find(q), q) for q in QUOTE_PAIRS if prompt.find(q) >= 0]
    if not openings:
        raise ValueError(f"prompt {prompt!r} has no text in double quotes for the OCR reward to look for")
    start, quote = min(openings)
    end = prompt.find(QUOTE_PAIRS[quote], start + 1)
    if end < 0:
        raise ValueError(f"prompt {prompt!r} opens a quote at character {start} and never closes it")
    text = prompt[start + 1:end]
    if not normalize(text):
        raise ValueError(f"prompt {prompt!r} quotes no text (only spaces or nothing)")
    return text


def normalize(text: str) -> str:
    """Lower-case, all whitespace removed, punctuation kept."""
    return "".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_score(recognised: str, target: str) -> float:
    """1 - min(d, len(tgt)) / len(tgt) with d = 0 when the target is inside the recognised text (§4.1)."""
    rec, tgt = normalize(recognised), normalize(target)
    if not tgt:
        raise ValueError("empty OCR target")
    distance = 0 if tgt in rec else levenshtein(rec, tgt)
    return 1.0 - min(distance, len(tgt)) / len(tgt)


def render_text(text: str, size: int = 256, font_size: int = 32, color: str = "black",
                background: str = "white") -> Image.Image:
    """`text` centred in PIL's default font, shrunk to fit the width (for tests and demos).

    rapidocr read single lines at 16-32 px on a 256 px canvas reliably in our trials.
    """
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    while True:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= size - 16 or font_size <= 8:
            break
        font_size -= 2
    draw.text(((size - right + left) / 2 - left, (size - bottom + top) / 2 - top), text, fill=color, font=font)
    return image


class OCREngine(ABC):
    @abstractmethod
    def read(self, images: list[Image.Image]) -> list[str]:
        """All text recognised in each image, joined in reading order ("" if none)."""


class RapidOCREngine(OCREngine):
    """rapidocr 3.x on onnxruntime, with the det/cls/rec models bundled in the wheel (no network)."""

    def __init__(self, threads: int | None = None, params: dict | None = None):
        """`threads`: onnxruntime intra-op threads (None: one per core; 1 is faster on a shared 2-core box).
        `params`: rapidocr config overrides, e.g. {"Det.limit_side_len": 960}."""
        from rapidocr import RapidOCR  # imported here: only this engine needs it

        # No angle classifier, as Flow-GRPO (use_angle_cls=False); detection keeps rapidocr's defaults, the
        # configuration measured in shared/notes/rewards.md §4.2.
        config = {"Global.log_level": "error", "Global.use_cls": False}
        if threads is not None:
            config["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        self.ocr = RapidOCR(params={**config, **(params or {})})

    def read(self, images):
        texts = []
        for image in images:
            output = self.ocr(np.asarray(image.convert("RGB")))
            texts.append("".join(output.txts or ()))  # txts is None when nothing was found
        return texts


ENGINES: dict[str, type[OCREngine]] = {"rapidocr": RapidOCREngine}


@dataclass
class OCRResult:
    target: str
    text: str  # what the engine read, as read
    score: float  # the reward
    exact: bool  # normalised text == normalised target (stricter than score == 1, which allows extra text)


class OCRReward(Reward):
    name = "ocr"

    def __init__(self, engine: str | OCREngine = "rapidocr", engine_options: dict | None = None):
        if isinstance(engine, OCREngine):
            self.engine = engine
        elif engine in ENGINES:
            self.engine = ENGINES[engine](**(engine_options or {}))
        else:
            raise ValueError(f"unknown OCR engine {engine!r}; available: {', '.join(ENGINES)}")

    def read(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None
             ) -> list[OCRResult]:
        """Per image: target, recognised text, reward and exact-match flag (what an OCR benchmark reports)."""
        metadata = metadata if metadata is not None else [{}] * len(images)
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        targets = [(meta or {}).get("text") or target_text(prompt) for prompt, meta in zip(prompts, metadata)]
        texts = self.engine.read(images)
        if len(texts) != len(images):
            raise ValueError(f"OCR engine returned {len(texts)} texts for {len(images)} images")
        return [OCRResult(target, text, ocr_score(text, target), normalize(text) == normalize(target))
                for target, text in zip(targets, texts)]

    def __call__(self, images, prompts, metadata):
        return [result.score for result in self.read(images, prompts, metadata)]
