import logging

import pytest
import torch

import policies

# Prompts of different lengths, so that every batch is left-padded.
PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left"]


@pytest.fixture(scope="session", params=policies.available())
def policy_name(request):
    return request.param


def build_tiny(policy_name: str, **options):
    """A tiny policy for the contract. A family whose image tokens are all forced (SEED-X) has its only choice in a
    think-then-draw plan, so it is built with a short plan switched on."""
    policy = policies.build(policy_name, tiny=True, **options)
    if not policy.free_image_tokens:
        from policies.plan import PlanSettings

        policy.set_plan(PlanSettings(max_tokens=6))
    return policy


@pytest.fixture(scope="session")
def tiny_policy(policy_name):
    """A fresh-weights tiny policy per family, fp32, CPU. Tests must not train it in place."""
    return build_tiny(policy_name)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    logging.getLogger("grpo_img").setLevel(logging.INFO)


def run_tiny_grpo(tmp_path, policy: str, policy_options: dict, steps: int, **overrides) -> list[dict]:
    """A short GRPO run of a tiny policy on the demo's colour reward; returns the per-step metrics.

    Families use it for their "reward rises" test: `policy_options` must make the tiny model's decoder able to
    paint the palette (e.g. `tiny_palette`), or the colour reward is flat and nothing can be learned.
    """
    import json

    from grpo_img.config import load_config
    from grpo_img.reporting import read_metrics
    from grpo_img.trainer import train

    values = {"policy": policy, "policy_options": json.dumps(policy_options), "max_steps": str(steps),
              "output_dir": str(tmp_path / "run"), "report_to": "none", "image_log_steps": "0",
              "save_steps": "0"}
    values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()})
    return read_metrics(train(load_config(None, values)))


def reward_rise(metrics: list[dict], window: int = 5) -> tuple[float, float]:
    """Mean reward of the first and of the last `window` steps."""
    first = sum(m["reward_mean"] for m in metrics[:window]) / window
    last = sum(m["reward_mean"] for m in metrics[-window:]) / window
    return first, last
