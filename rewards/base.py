"""The reward contract: `reward(images, prompts, metadata) -> list[float]`.

A reward scores each image against its prompt. `metadata` carries per-prompt fields a reward may read (GenEval's
`tag`/`include`, an OCR target, ...). A reward may return NaN (or None) for a sample it cannot score; the trainer
masks such samples out of the advantages instead of inventing a score.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod

import torch
from PIL import Image

log = logging.getLogger("rewards")


class RewardContractError(ValueError):
    """The reward broke the contract (wrong number of scores, a non-number): a bug to fix, never isolated."""


class RewardUnavailable(RuntimeError):
    """The reward cannot score anything right now (e.g. its server is down): the whole batch goes unscored, with
    no per-sample retry (it would only wait again, once per sample)."""


class Reward(ABC):
    name: str = ""

    @abstractmethod
    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> list[float]:
        """One float per image."""


def as_scores(values, count: int, name: str = "reward") -> list[float]:
    """A reward's output as floats, NaN for None/NaN/inf (unscored); RewardContractError for anything else."""
    values = list(values)
    if len(values) != count:
        raise RewardContractError(f"{name} returned {len(values)} scores for {count} images")
    scores = []
    for i, value in enumerate(values):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensor / numpy array
            value = value.item()
        if value is None:
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardContractError(f"{name} returned {value!r} ({type(value).__name__}) for sample {i}; "
                                      "a reward must return numbers (or None/NaN for 'cannot score')")
        value = float(value)
        scores.append(value if math.isfinite(value) else math.nan)
    return scores


def score_isolated(reward: Reward, images, prompts, metadata, name: str = "reward"
                   ) -> tuple[list[float], list[str | None]]:
    """Scores and, per sample, why it has none (None when scored).

    If the batch call raises, samples are scored one by one so that one bad sample costs only itself. Contract
    errors propagate; `RewardUnavailable` leaves the whole batch unscored without retrying sample by sample.
    """
    count = len(images)
    try:
        scores = as_scores(reward(images, prompts, metadata), count, name)
        return scores, [None if math.isfinite(s) else "no score (None, NaN or an infinite value)" for s in scores]
    except RewardContractError:
        raise
    except RewardUnavailable as error:
        log.warning("%s unavailable: %s", name, error)
        return [math.nan] * count, [f"{type(error).__name__}: {error}"] * count
    except Exception as batch_error:  # noqa: BLE001 - a reward model may fail in any way; we isolate it
        log.warning("%s failed on the batch (%s: %s); scoring samples one by one", name,
                    type(batch_error).__name__, batch_error)
    scores, errors = [], []
    for image, prompt, meta in zip(images, prompts, metadata):
        try:
            score = as_scores(reward([image], [prompt], [meta]), 1, name)[0]
            error = None if math.isfinite(score) else "no score (None, NaN or an infinite value)"
        except RewardContractError:
            raise
        except Exception as sample_error:  # noqa: BLE001
            score, error = math.nan, f"{type(sample_error).__name__}: {sample_error}"
            log.warning("%s failed on prompt %r: %s", name, prompt, error)
        scores.append(score)
        errors.append(error)
    return scores, errors


class WeightedSum(Reward):
    """sum_i w_i * r_i over named parts; `last_parts` keeps each part's scores and `last_failures` each part's
    count of unscored samples, for logging.

    Each part is scored in isolation (`score_isolated`): a part that raises on one sample costs that sample only.
    A sample that any part cannot score (NaN) gets NaN in the sum: a partial sum would be a silently different
    reward.
    """

    name = "weighted_sum"

    def __init__(self, parts: dict[str, tuple[Reward, float]]):
        if not parts:
            raise ValueError("a composite reward needs at least one part")
        self.parts = parts
        self.last_parts: dict[str, list[float]] = {}
        self.last_failures: dict[str, int] = {}

    def __call__(self, images, prompts, metadata):
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        total = [0.0] * len(images)
        self.last_parts, self.last_failures = {}, {}
        for part_name, (reward, weight) in self.parts.items():
            scores, errors = score_isolated(reward, images, prompts, metadata, f"reward {part_name!r}")
            self.last_parts[part_name] = scores
            self.last_failures[part_name] = sum(e is not None for e in errors)
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


def score_with_isolation(reward_fn: Reward, images, prompts, metadata) -> tuple[torch.Tensor, int]:
    """Rewards as a float tensor, NaN where a sample has no score, and how many have none (see score_isolated)."""
    scores, errors = score_isolated(reward_fn, images, prompts, metadata)
    failures = sum(e is not None for e in errors)
    if failures:
        log.warning("%d of %d sample(s) unscored, left out of the loss; first reason: %s", failures, len(errors),
                    next(e for e in errors if e is not None))
    return torch.tensor(scores, dtype=torch.float32), failures
