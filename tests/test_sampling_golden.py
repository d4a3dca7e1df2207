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
