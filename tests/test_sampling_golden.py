"""Sampling is bitwise what it was when `tests/data/sampling_golden.json` was recorded (see golden_sampling.py):
same tokens, same log-probs, same action masks, for every family, with and without a plan."""

import json

import pytest
import torch

from golden_sampling import CASES, GOLDEN, record

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_the_recording(case):
    now = record(case)
    for settings, expected in RECORDED[case].items():
        got = now[settings]
        assert got["tokens"] == expected["tokens"], f"{case}/{settings}: tokens changed"
        assert got["action_mask"] == expected["action_mask"], f"{case}/{settings}: action mask changed"
        assert torch.equal(torch.tensor(got["logprobs"]), torch.tensor(expected["logprobs"])), \
            f"{case}/{settings}: log-probs changed"


def test_every_family_samples_the_same_on_the_static_cache(tiny_policy):
    """The engine's static-cache decode loop draws exactly what the dynamic one draws, for every family."""
    from conftest import PROMPTS

    def draw(static: bool):
        tiny_policy.set_decoding(static_cache=static)
        try:
            return tiny_policy.sample(PROMPTS, 2, cfg_scale=3.0, top_k=16, generator=torch.Generator().manual_seed(3))
        finally:
            tiny_policy.set_decoding(static_cache=False)

    dynamic, static = draw(False), draw(True)
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    assert torch.allclose(dynamic.logprobs, static.logprobs, atol=1e-5)


def test_chameleon_interleaved_samples_the_same_on_the_static_cache():
    import policies
    from conftest import PROMPTS

    policy = policies.build("chameleon", tiny=True, mode="interleaved", text_tokens=6, seed=1)
    dynamic = policy.sample(PROMPTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    policy.set_decoding(static_cache=True)
    static = policy.sample(PROMPTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    assert torch.equal(dynamic.extras["completion_mask"], static.extras["completion_mask"])
