"""The reward contract: `reward(images, prompts, metadata) -> list[float]`.

A reward scores each image against its prompt. `metadata` carries per-prompt fields a reward may read (GenEval's
`tag`/`include`, an OCR target, ...). A reward may return NaN (or None) for a sample it cannot score; the trainer
masks such samples out of the advantages instead of inventing a score.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from PIL import Image


class Reward(ABC):
    name: str = ""

    @abstractmethod
    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> list[float]:
        """One float per image."""


class WeightedSum(Reward):
    """sum_i w_i * r_i over named parts; `last_parts` keeps each part's scores for logging.

    A sample that any part cannot score (NaN) gets NaN in the sum: a partial sum would be a silently different
    reward.
    """

    name = "weighted_sum"

    def __init__(self, parts: dict[str, tuple[Reward, float]]):
        if not parts:
            raise ValueError("a composite reward needs at least one part")
        self.parts = parts
        self.last_parts: dict[str, list[float]] = {}

    def __call__(self, images, prompts, metadata):
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        total = [0.0] * len(images)
        self.last_parts = {}
        for part_name, (reward, weight) in self.parts.items():
            scores = [math.nan if s is None else float(s) for s in reward(images, prompts, metadata)]
            if len(scores) != len(images):
                raise ValueError(f"reward {part_name!r} returned {len(scores)} scores for {len(images)} images")
            self.last_parts[part_name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total
