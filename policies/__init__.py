"""Token-level image policies, one file per model family, built by name."""

from __future__ import annotations

import importlib
import inspect

from policies.base import Policy, Rollout, SamplingSettings

# name -> "module:Class"; modules are imported on first use so that one family's heavy imports stay out of the others.
REGISTRY: dict[str, str] = {
    "chameleon": "policies.chameleon:ChameleonPolicy",
    "emu3": "policies.emu3:Emu3Policy",
    "janus": "policies.janus:JanusPolicy",
    "blip3o_next": "policies.blip3o_next:Blip3oNextPolicy",
    "seed_x": "policies.seed_x:SeedXPolicy",
}


def available() -> list[str]:
    return sorted(REGISTRY)


def policy_class(name: str) -> type[Policy]:
    """A registered family by name, or your own `Policy` subclass given as "package.module:ClassName"."""
    if name in REGISTRY:
        return import_object(REGISTRY[name], "policy")
    if ":" not in name:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available())}, or a Policy subclass "
                         "as 'module:ClassName'")
    cls = import_object(name, "policy")
    if not (inspect.isclass(cls) and issubclass(cls, Policy)):
        raise ValueError(f"policy {name!r} is not a subclass of policies.base.Policy")
    return cls


def import_object(spec: str, what: str):
    """`module:attribute`, imported; a clear error when either part is missing."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({error})") from None
    if not hasattr(module, attribute):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


# Options of the engine (policies/base.py), the same for every family.
ENGINE_OPTIONS = ("static_cache", "compile_decode", "layer_loop", "half_kv_on_cpu")


def build(name: str, *, model_name_or_path: str | None = None, tiny: bool = False, device: str | None = None,
          **options) -> Policy:
    """Build a registered policy: `build("janus", tiny=True)` (the same architecture, random weights, offline) or
    `build("janus", model_name_or_path=ID_OR_DIR)` (real weights), frozen, on `device`.

    `static_cache=True` chooses the decode loop's static-cache path and `compile_decode=True` compiles its step
    (CUDA graphs on CUDA; `compile_decode` alone implies the static cache, `static_cache=False` with it compiles the
    default path's step), `layer_loop=False` runs decode steps through the stack's forward, `half_kv_on_cpu=True`
    keeps a bf16/fp16 model's KV cache in its dtype on CPU (the engine's options, policies/base.py, the same for any
    family); every other option is the family's (its `build` signature)."""
    cls = policy_class(name)
    if tiny == (model_name_or_path is not None):
        raise ValueError(f"{name}: give exactly one of model_name_or_path=... or tiny=True")
    engine = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
    accepted = set(inspect.signature(cls.build).parameters) - {"cls", "model_name_or_path", "tiny"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy {name!r}; accepted: "
                         f"{', '.join(sorted([*accepted, *ENGINE_OPTIONS, 'device']))}")
    policy = cls.build(model_name_or_path=model_name_or_path, tiny=tiny, **options)
    policy.freeze()
    policy.set_decoding(**engine)
    return policy.to(device) if device is not None else policy


__all__ = ["Policy", "Rollout", "SamplingSettings", "available", "build", "policy_class"]
