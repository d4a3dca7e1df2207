"""Weight-free demo reward: how much of the image shows the colour named in the prompt.

Score = fraction of pixels whose nearest palette colour (Euclidean in RGB) is the colour named in the prompt, in
[0, 1]. The colour is the first palette word in the prompt, or `metadata["color"]` when given. A prompt that names
no palette colour cannot be scored and raises: a silent 0 would teach the policy nonsense.
"""

from __future__ import annotations

import re

import numpy as np

from rewards.base import Reward
from rewards.palette import COLORS


def named_color(prompt: str, palette: dict[str, tuple[int, int, int]] = COLORS) -> str | None:
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in palette:
            return word
    return None


class ColorReward(Reward):
    name = "color"

    def __init__(self, colors: list[str] | None = None):
        names = colors or list(COLORS)
        unknown = [c for c in names if c not in COLORS]
        if unknown:
            raise ValueError(f"unknown colour(s) {unknown}; known: {', '.join(COLORS)}")
        self.palette = {c: COLORS[c] for c in names}
        self._rgb = np.array(list(self.palette.values()), dtype=np.float32)  # [K, 3]

    def __call__(self, images, prompts, metadata):
        scores = []
        for image, prompt, meta in zip(images, prompts, metadata, strict=True):
            target = (meta or {}).get("color") or named_color(prompt, self.palette)
            if target not in self.palette:
                raise ValueError(f"prompt {prompt!r} names none of the colours {list(self.palette)}")
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
            nearest = ((pixels - self._rgb[None]) ** 2).sum(-1).argmin(-1)
            scores.append(float((nearest == list(self.palette).index(target)).mean()))
        return scores


class PlanColorReward(Reward):
    """Demo reward for think-then-draw: the fraction of the plan's words that are the colour the prompt names.

    It reads only `metadata["plan"]` (the images are ignored), which is what a family whose image the policy cannot
    choose (SEED-X) can learn in a toy world. A sample without a plan cannot be scored and raises."""

    name = "plan_color"

    def __call__(self, images, prompts, metadata):
        scores = []
        for prompt, meta in zip(prompts, metadata, strict=True):
            if not meta or "plan" not in meta:
                raise ValueError("plan_color scores the think-then-draw plan: set `plan: true`")
            target = meta.get("color") or named_color(prompt)
            if target is None:
                raise ValueError(f"prompt {prompt!r} names no colour of {list(COLORS)}")
            words = re.findall(r"[a-z]+", meta["plan"].lower())
            scores.append(sum(word == target for word in words) / max(len(words), 1))
        return scores

