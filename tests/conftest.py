import logging

import pytest
import torch

import policies

# Prompts of different lengths, so that every batch is left-padded.
PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left"]


@pytest.fixture(scope="session", params=policies.available())
def policy_name(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_policy(policy_name):
    """A fresh-weights tiny policy per family, fp32, CPU. Tests must not train it in place."""
    return policies.build(policy_name, tiny=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    logging.getLogger("grpo_img").setLevel(logging.INFO)
