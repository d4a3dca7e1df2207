"""Sampling is what it was when `tests/data/sampling_golden.json` was recorded (see golden_sampling.py): the same
tokens and action masks bitwise, for every family, with and without a plan, and the same log-probs to 1e-4.

Log-probs are compared to a tolerance, not bitwise: they are float32 reductions whose last bits depend on the
CPU's kernels. The recording was made on another processor type than some CI machines (on an AMD EPYC they are up
to 8.6e-6 apart, every token the same); 1e-4 is the tolerance the sampler and the scorer are held to."""

import json

import pytest
import torch

import policies
from policies.base import cpp_compiler_found

from golden_sampling import CASES, GOLDEN, record

RECORDED = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampling_matches_the_recording(case):
    now = record(case)
    for settings, expected in RECORDED[case].items():
        got = now[settings]
        assert got["tokens"] == expected["tokens"], f"{case}/{settings}: tokens changed"
        assert got["action_mask"] == expected["action_mask"], f"{case}/{settings}: action mask changed"
        difference = (torch.tensor(got["logprobs"]) - torch.tensor(expected["logprobs"])).abs().max().item()
        assert difference <= 1e-4, f"{case}/{settings}: log-probs changed by up to {difference:.2e}"


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


@pytest.mark.skipif(not cpp_compiler_found(), reason="inductor needs a C++ compiler for CPU kernels")
@pytest.mark.parametrize("static", [True, False], ids=["static_cache", "default_path"])
def test_every_family_samples_the_same_through_the_compiled_step(tiny_policy, static):
    """`compile_decode` (torch.compile of the decode step; inductor's C++ kernels on CPU) draws the eager path's
    tokens, log-probs within 1e-4 (fused kernels reorder float32 sums), for every family, on the static cache (the
    GPU path's fixed shapes) and on the default path (dynamic sizes: the cache grows every step); and a second
    rollout of the same shapes reuses the compiled graph: a recompilation raises (`fail_on_recompile`), as a graph
    break that re-traced every step would.

    Each case checks that its compiled draw really built a graph. Every family's step is the same function (the
    layer loop's closure), and dynamo keeps at most 8 entries per code object (`recompile_limit`): while the engine
    compiled that function itself, this session's earlier cases filled them and the later ones (Janus) silently ran
    eagerly. The engine now compiles a copy with a code object of its own per policy and path."""
    from conftest import PROMPTS
    from torch._dynamo.utils import counters

    def draw(compiled: bool, seed: int):
        tiny_policy.set_decoding(static_cache=static, compile_decode=compiled)
        assert tiny_policy.static_cache == static
        try:
            return tiny_policy.sample(PROMPTS, 2, cfg_scale=3.0, top_k=16,
                                      generator=torch.Generator().manual_seed(seed))
        finally:
            tiny_policy.set_decoding(static_cache=False)

    eager = draw(False, 5)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = draw(True, 5)
    if tiny_policy.free_image_tokens:  # SEED-X forces its image tokens: it has no decode step to compile
        assert counters["stats"]["unique_graphs"] > graphs_before, "the compiled draw built no graph"
        assert ("default", static, True) in tiny_policy._compiled_steps  # this path's own compiled step
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-4, rtol=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = draw(True, 6)
    assert torch.equal(again.completion_ids, draw(False, 6).completion_ids)


def test_every_family_samples_the_same_through_its_stack_forward(tiny_policy):
    """`layer_loop=False` (decode steps through the stack's forward) draws exactly what the default layer loop
    draws, for every family; the option travels through `build` like the other engine options."""
    from conftest import PROMPTS

    def draw():
        return tiny_policy.sample(PROMPTS, 2, cfg_scale=3.0, top_k=16, generator=torch.Generator().manual_seed(4))

    looped = draw()
    tiny_policy.set_decoding(layer_loop=False)
    try:
        forward = draw()
    finally:
        tiny_policy.set_decoding(layer_loop=True)
    assert torch.equal(looped.completion_ids, forward.completion_ids)
    assert torch.equal(looped.logprobs, forward.logprobs)
    assert not policies.build("janus", tiny=True, layer_loop=False, half_kv_on_cpu=True).layer_loop


def test_chameleon_interleaved_samples_the_same_on_the_static_cache():
    import policies
    from conftest import PROMPTS

    policy = policies.build("chameleon", tiny=True, mode="interleaved", text_tokens=6, seed=1)
    dynamic = policy.sample(PROMPTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    policy.set_decoding(static_cache=True)
    static = policy.sample(PROMPTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    assert torch.equal(dynamic.extras["completion_mask"], static.extras["completion_mask"])
