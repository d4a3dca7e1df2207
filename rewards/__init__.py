"""Pluggable rewards, one file each, built by name."""

from __future__ import annotations

import importlib
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
}


def available() -> list[str]:
    return sorted(REGISTRY)


def build(name: str, **options) -> Reward:
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
    module_name, class_name = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown and not takes_any:
        raise ValueError(f"unknown option(s) {unknown} for reward {name!r}; accepted: "
                         f"{', '.join(p for p in params if p != 'self')}")
    return cls(**options)


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
