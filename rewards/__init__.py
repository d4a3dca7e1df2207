"""Pluggable rewards, one file each, built by name."""

from __future__ import annotations

import inspect

from rewards.base import Reward, WeightedSum

REGISTRY: dict[str, str] = {
    "color": "rewards.color:ColorReward",
    "plan_color": "rewards.color:PlanColorReward",
    "clip": "rewards.clip:CLIPScoreReward",
    "pickscore": "rewards.pickscore:PickScoreReward",
    "hpsv2": "rewards.hpsv2:HPSv2Reward",
    "aesthetic": "rewards.aesthetic:AestheticReward",
    "geneval": "rewards.geneval:GenEvalReward",
    "ocr": "rewards.ocr:OCRReward",
    "remote": "rewards.remote:RemoteReward",
    "vlm_judge": "rewards.vlm_judge:VLMJudgeReward",
}


def available() -> list[str]:
    return sorted(REGISTRY)


def reward_factory(name: str):
    """A registered reward's class, or your own given as "package.module:Name": a `Reward` subclass or a function
    that returns one (called with the entry's options), or a plain scoring function
    `f(images, prompts, metadata) -> list[float]` (no options)."""
    from policies import import_object

    if name in REGISTRY:
        return import_object(REGISTRY[name], "reward")
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}, or your own as "
                         "'module:Name'")
    target = import_object(name, "reward")
    if not callable(target):
        raise ValueError(f"reward {name!r} is not callable")
    return target


def build(name: str, **options) -> Reward:
    cls = reward_factory(name)
    if not (inspect.isclass(cls) and issubclass(cls, Reward)):  # your own: a factory, or a scoring function
        params = inspect.signature(cls).parameters
        if list(params)[:3] == ["images", "prompts", "metadata"]:
            if options:
                raise ValueError(f"reward {name!r} is a scoring function: it takes no options, got {sorted(options)}")
            return FunctionReward(cls, name)
        reward = cls(**options)
        if not isinstance(reward, Reward):
            raise ValueError(f"reward {name!r} returned {type(reward).__name__}, not a rewards.base.Reward")
        return reward
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown and not takes_any:
        raise ValueError(f"unknown option(s) {unknown} for reward {name!r}; accepted: "
                         f"{', '.join(p for p in params if p != 'self')}")
    return cls(**options)


class FunctionReward(Reward):
    """A plain scoring function `f(images, prompts, metadata) -> list[float]` as a reward."""

    def __init__(self, function, name: str):
        self.function, self.name = function, name

    def __call__(self, images, prompts, metadata):
        return self.function(images, prompts, metadata)


def build_composite(specs: list[dict]) -> WeightedSum:
    """`[{"name": "color", "weight": 1.0, **options}, ...]` -> one weighted sum whose parts are logged."""
    parts = {}
    for spec in specs:
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"reward entry {spec} has no 'name'")
        name = spec.pop("name")
        weight = float(spec.pop("weight", 1.0))
        key = name if name not in parts else f"{name}_{len(parts)}"
        parts[key] = (build(name, **spec), weight)
    return WeightedSum(parts)


__all__ = ["Reward", "WeightedSum", "available", "build", "build_composite"]
