"""Recorded samples of every tiny family at fixed seeds: the guard rail that refactors keep sampling bitwise unchanged.

`python tests/golden_sampling.py` rewrites `tests/data/sampling_golden.json` from the current code; do that only
when a change is *meant* to change what is sampled, and say so in the commit. `test_sampling_golden.py` compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import policies  # noqa: E402
from policies.plan import PlanSettings  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "sampling_golden.json"
PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left"]
SETTINGS = {
    "guided": dict(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0),
    "truncated": dict(cfg_scale=2.0, temperature=0.9, top_k=32, top_p=0.9),
}
PLAN = PlanSettings(max_tokens=6, temperature=1.3)

# case name -> (family, build options, with a plan)
CASES = {
    "janus": ("janus", {}, False),
    "janus_static": ("janus", {"static_cache": True}, False),
    "janus_plan": ("janus", {}, True),
    "emu3": ("emu3", {}, False),
    "emu3_plan": ("emu3", {}, True),
    "chameleon": ("chameleon", {}, False),
    "chameleon_interleaved": ("chameleon", {"mode": "interleaved", "text_tokens": 8}, False),
    "chameleon_plan": ("chameleon", {}, True),
    "blip3o_next": ("blip3o_next", {}, False),
    "blip3o_next_full_vocab": ("blip3o_next", {"restrict_to_image_tokens": False}, False),
    "blip3o_next_plan": ("blip3o_next", {}, True),
    "seed_x_plan": ("seed_x", {}, True),
}


def record(case: str) -> dict:
    family, options, with_plan = CASES[case]
    policy = policies.build(family, tiny=True, **options)
    if with_plan:
        policy.set_plan(PLAN)
    out = {}
    for name, settings in SETTINGS.items():
        rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(7), **settings)
        out[name] = {"tokens": rollout.completion_ids.tolist(), "logprobs": rollout.logprobs.tolist(),
                     "action_mask": rollout.action_mask.tolist()}
    return out


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({case: record(case) for case in CASES}))
    print(f"wrote {GOLDEN}")
