"""The speed paths sample what the plain paths sample, and the benchmark scripts run end to end on tiny settings.

Timings themselves are not asserted here (they belong to the scripts' output, see docs/performance.md)."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policies
from policies.base import SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left"]


@pytest.fixture(scope="module")
def janus():
    return policies.build("janus", tiny=True)


@pytest.mark.parametrize("cfg_scale,top_k,top_p", [(5.0, 0, 1.0), (1.0, 0, 1.0), (3.0, 20, 0.9)])
def test_static_cache_samples_exactly_what_the_dynamic_cache_samples(janus, cfg_scale, top_k, top_p):
    """Same generator, left-padded prompts, groups of 3: identical tokens and log-probs.
    The first and last cases have the same shapes, so the last one also runs on the reused cache."""
    knobs = dict(cfg_scale=cfg_scale, top_k=top_k, top_p=top_p)
    dynamic = janus.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(7), **knobs)
    janus.static_cache = True
    try:
        static = janus.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(7), **knobs)
    finally:
        janus.static_cache = False
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(static.prompt_ids, dynamic.prompt_ids)
    # and the rows are really different samples (the comparison is not between constant sequences)
    assert not torch.equal(static.completion_ids[0], static.completion_ids[1])


def test_compile_option_decodes_eagerly_without_a_cpp_compiler(janus, caplog, monkeypatch):
    """On CPU `compile_decode` needs inductor's C++ compiler; without one the static step runs eagerly, with a
    warning, and samples what it would have."""
    monkeypatch.setattr("policies.base.cpp_compiler_found", lambda: False)
    policy = policies.build("janus", tiny=True, compile_decode=True)
    assert policy.static_cache and policy.compile_decode
    rollout = policy.sample(PROMPTS[:1], 2, cfg_scale=5.0, generator=torch.Generator().manual_seed(0))
    reference = janus.sample(PROMPTS[:1], 2, cfg_scale=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rollout.completion_ids, reference.completion_ids)
    assert "compile_decode needs CUDA, or a C++ compiler on CPU" in caplog.text
    assert not getattr(policy, "_compiled_steps", None)
    # compiling chooses the static cache unless told otherwise: then it compiles the default path's step
    dynamic = policies.build("janus", tiny=True, static_cache=False, compile_decode=True)
    assert dynamic.compile_decode and not dynamic.static_cache


def test_generate_baseline_uses_the_same_distribution(janus):
    """With top_k=1 both loops are greedy: transformers' `generate` and `policy.sample` must pick the same codes
    (one unpadded prompt, where generate's arange positions equal ours), so the benchmark compares like with like."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.rollout import janus_generate, janus_two_pass_sample
    finally:
        sys.path.remove(str(ROOT))
    settings = SamplingSettings(cfg_scale=5.0, top_k=1)
    ours = janus.sample(PROMPTS[1:], 2, cfg_scale=5.0, top_k=1).completion_ids
    theirs = janus_generate(janus, PROMPTS[1:], 2, settings, seed=0)
    assert torch.equal(ours, theirs)
    two_passes = janus_two_pass_sample(janus, PROMPTS[1:], 2, settings, None)
    assert torch.equal(ours, two_passes)


def _run_script(name: str, args: list[str], monkeypatch, capsys) -> list[str]:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("family,methods", [
    ("janus", ("generate", "sample", "sample_static", "sample_prefill_per_sample", "sample_cfg_two_passes")),
    ("emu3", ("generate", "sample", "sample_prefill_per_sample")),
    ("blip3o_next", ("generate", "sample", "sample_prefill_per_sample")),
    ("chameleon", ("generate", "sample", "sample_prefill_per_sample")),
])
def test_rollout_benchmark_runs_and_prints_its_speedup(family, methods, monkeypatch, capsys):
    cfg = "1" if family == "blip3o_next" else "3"
    lines = _run_script("rollout.py", ["--policy", family, "--tiny", "--batch", "2", "--group", "2", "--cfg", cfg,
                                       "--repeats", "1", "--ablations"], monkeypatch, capsys)
    table = "\n".join(lines)
    for method in methods:
        assert re.search(rf"^{method} +\d+\.\d+ ", table, re.M), method
    # ms per step at the start and the end of the image, from the warm-up run (the tiny Emu3 and BLIP3o-NEXT
    # images, 23 and 16 tokens, are too short for two windows of 8 steps)
    if family in ("janus", "chameleon"):
        assert re.search(r"^sample +\d+\.\d+ +\d+\.\d+ +\d+ +\d+\.\d +\d+\.\d ", table, re.M)
    assert re.fullmatch(r"speedup_vs_generate=\d+\.\d\d", lines[-1])


def test_grpo_step_benchmark_runs_and_prints_its_split(monkeypatch, capsys):
    lines = _run_script("grpo_step.py", ["--policy", "janus", "--tiny", "--group", "2", "--prompts", "1",
                                         "--steps", "1"], monkeypatch, capsys)
    table = "\n".join(lines)
    for part in ("sample", "decode", "reward", "scoring_forward", "backward", "optimizer"):
        assert re.search(rf"^{part} +\d+\.\d+ ", table, re.M), part
    assert re.fullmatch(r"step_seconds=\d+\.\d\d", lines[-1])


def test_step_profile_runs_and_prints_the_growth(monkeypatch, capsys):
    lines = _run_script("step_profile.py", ["--size", "cpu-bench", "--batch", "2", "--group", "2"], monkeypatch,
                        capsys)
    table = "\n".join(lines)
    for method in ("policy.sample", "policy.sample static", "generate"):
        assert re.search(rf"^{method} +(\d+\.\d +){{4}}\d+\.\d\d +\d+\.\d$", table, re.M), method
    assert re.fullmatch(r"end_over_start=\d+\.\d\d", lines[-1])


def test_real_sizes_that_do_not_fit_are_refused_with_a_clear_message():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.common import check_fits
    finally:
        sys.path.remove(str(ROOT))
    with pytest.raises(SystemExit, match="refusing to build janus Janus-Pro-7B.*GiB"):
        check_fits(10**15, "cpu", "janus Janus-Pro-7B in torch.bfloat16")
    check_fits(10**6, "cpu", "a small model")  # fits: no exit


def test_scoring_memory_benchmark_runs_and_chunks_score_the_same(monkeypatch, capsys):
    """Tiny head: the script itself checks that the chunked restricted head gives the unchunked log-probs."""
    lines = _run_script("scoring_memory.py", ["--rows", "2", "--tokens", "64", "--hidden", "32", "--vocab", "2000",
                                              "--image-vocab", "500", "--chunk", "16"], monkeypatch, capsys)
    assert re.fullmatch(r"restricted_over_full_memory=\d+\.\d\d", lines[-1])


@pytest.mark.parametrize("family,cfg_scale", [("emu3", 3.0), ("blip3o_next", 1.0), ("chameleon", 3.0)])
def test_other_families_generate_baselines_use_the_same_distribution(family, cfg_scale):
    """With top_k=1, `generate` (Emu3: prefix constraint + unbatched CFG; BLIP3o-NEXT: plain, no CFG as released;
    Chameleon: the benchmark's plain KV-cache loop) and `policy.sample` pick the same tokens on left-padded prompts, so the baseline samples what the policy does."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.rollout import FAMILIES
    finally:
        sys.path.remove(str(ROOT))
    policy = policies.build(family, tiny=True)
    settings = SamplingSettings(cfg_scale=cfg_scale, top_k=1)
    ours = policy.sample(PROMPTS, 2, cfg_scale=cfg_scale, top_k=1).completion_ids
    theirs = FAMILIES[family].generate(policy, PROMPTS, 2, settings, 0)
    assert torch.equal(ours, theirs)


def test_static_cache_with_think_then_draw_contexts():
    """Per-sample contexts (prompt + its own plan): the static path still samples what the dynamic one does."""
    from policies.plan import PlanSettings

    policy = policies.build("janus", tiny=True)
    policy.set_plan(PlanSettings(max_tokens=6))
    dynamic = policy.sample(PROMPTS, 3, cfg_scale=5.0, generator=torch.Generator().manual_seed(1))
    policy.static_cache = True
    static = policy.sample(PROMPTS, 3, cfg_scale=5.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=0)


def test_kv_cache_estimate_is_the_static_cache_the_engine_keeps_and_fit_memory_halves_to_it(janus, monkeypatch):
    """`--fit-memory` sizes the batch by `kv_cache_bytes`: it must be the cache the engine really allocates (here the
    static caches the policy keeps between rollouts, which `release_static_caches` drops), and the batch must halve
    until that cache fits, or the run stop with a clear message."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import rollout
    finally:
        sys.path.remove(str(ROOT))
    family = rollout.FAMILIES["janus"]
    prompts = [rollout.PROMPTS[i % len(rollout.PROMPTS)] for i in range(4)]
    janus.release_static_caches()  # the module's earlier tests left theirs
    janus.static_cache = True
    try:
        janus.sample(prompts, 2, cfg_scale=5.0, generator=torch.Generator().manual_seed(0))
    finally:
        janus.static_cache = False
    kept = [t for cache in janus._static_caches.values() for layer in cache.layers for t in (layer.keys, layer.values)]
    length = janus.encode_prompts(prompts)[0].shape[1] + janus.num_completion_tokens - 1  # the last token is not fed
    assert sum(t.numel() * t.element_size() for t in kept) == rollout.kv_cache_bytes(janus, family, 16, length)
    janus.release_static_caches()
    assert not getattr(janus, "_static_caches", None)

    def need(batch: int) -> float:  # what batch_that_fits asks for `batch` images with CFG, headroom included
        width = janus.encode_prompts(prompts[: batch // 2])[0].shape[1]
        return 1.2 * rollout.kv_cache_bytes(janus, family, 2 * batch, width + janus.num_completion_tokens)

    cpu = torch.device("cpu")
    monkeypatch.setattr(rollout, "free_memory", lambda device: (need(8) + 1, "a small device"))
    assert rollout.batch_that_fits(janus, family, 8, 2, True, cpu) == 8
    monkeypatch.setattr(rollout, "free_memory", lambda device: (need(4) + 1, "a small device"))
    assert rollout.batch_that_fits(janus, family, 8, 2, True, cpu) == 4
    monkeypatch.setattr(rollout, "free_memory", lambda device: (need(2) - 1, "a small device"))
    with pytest.raises(SystemExit, match="not even one prompt x --group 2 fits in a small device"):
        rollout.batch_that_fits(janus, family, 8, 2, True, cpu)


def test_timed_in_turn_runs_each_method_to_its_end_and_then_releases_it():
    """On a GPU the rollout benchmark times the methods one after the other (`interleave=False`), so that a method's
    kept memory is released before the next one starts; on CPU they take turns within each round."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.common import timed_interleaved
    finally:
        sys.path.remove(str(ROOT))
    calls = []
    methods = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    timed_interleaved(methods, torch.device("cpu"), repeats=2, interleave=False,
                      release=lambda name: calls.append(f"release {name}"))
    assert calls == ["a", "a", "a", "release a", "b", "b", "b", "release b"]  # warm-up, two rounds, release
    calls.clear()
    timed_interleaved(methods, torch.device("cpu"), repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]


def test_cudagraph_skips_counts_what_inductor_reports_as_skipped():
    """The suite's `cudagraph_skips` reads the counter inductor bumps when it runs a compiled graph without its CUDA
    graph (a skip is otherwise only a warning): bumped here through inductor's own function, so a renamed counter in
    another torch release fails here rather than reading 0 on the first GPU run."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.common import cudagraph_skips
    finally:
        sys.path.remove(str(ROOT))
    before = int(cudagraph_skips("reduce-overhead"))
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to a test")
    assert int(cudagraph_skips("reduce-overhead")) == before + 1
    assert cudagraph_skips("default") == cudagraph_skips(None) == "n/a"


def test_gpu_suite_runs_end_to_end_at_tiny_size_on_cpu():
    """benchmarks/gpu_suite.py must not fail on its first GPU run for a reason a CPU can find: its parts, their
    arguments and the parsing of their figures run here on the tiny model."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    # no CUDA graph on CPU: the skip count is "n/a" there, a number on a GPU
    assert re.fullmatch(r"gpu_suite rollout_tiny: images=4 speedup_vs_generate=\d+\.\d\d roofline=\d+% cudagraph_skips=n/a; "
                        r"grpo_step_tiny: step_seconds=\d+\.\d\d peak_memory_mib=\d+ cudagraph_skips=n/a",
                        summary), summary


def test_reward_server_benchmark_runs_both_servers_and_prints_the_ratio():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reward_server.py"), "--clients", "3",
                           "--requests", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.match(r"stdlib +12 images in", lines[0]) and re.match(r"batching +12 images in .* reward calls", lines[1])
    assert re.fullmatch(r"batched_over_serial=\d+\.\d\d", lines[-1])


def test_preallocated_cache_decodes_what_the_growing_dynamic_cache_decodes(janus):
    """The default decode path keeps its KV cache in buffers sized once (no torch.cat per step): every step's hidden
    state equals the one transformers' own DynamicCache gives on the same left-padded rows, the buffers keep their
    storage across steps, and stepping past the size it was built for is an error, not a silent reallocation."""
    from transformers import DynamicCache

    from policies.base import CachedDecoder, PreallocatedLayer

    ids, mask = janus.encode_prompts(PROMPTS)
    ids, mask = janus.guidance_rows(ids, mask, True)
    inputs = janus.context_inputs(ids)

    def last_hidden(inputs, mask, positions, cache):
        return janus.hidden_states(inputs, mask, positions, cache)[:, -1]

    steps = 6
    fast = CachedDecoder(last_hidden, inputs, mask, 2, DynamicCache(), max_new_tokens=steps)
    layers = [layer for layer in fast.cache.layers]
    assert all(isinstance(layer, PreallocatedLayer) for layer in layers)
    storage = [layer.key_buffer.data_ptr() for layer in layers]
    reference_cache = DynamicCache()
    reference_mask = mask.repeat_interleave(2, 0)
    reference = last_hidden(inputs, mask, mask.long().cumsum(-1).clamp(min=1) - 1, reference_cache)
    reference_cache.batch_repeat_interleave(2)
    reference = reference.repeat_interleave(2, 0)
    torch.testing.assert_close(fast.last, reference, atol=0, rtol=0)
    codes = torch.randint(0, 256, (len(reference_mask), steps), generator=torch.Generator().manual_seed(0))
    for t in range(steps):
        attended = torch.ones(len(reference_mask), dtype=torch.long)
        attended[0] = t % 2  # a masked column (a finished row's padding) on one row
        step_inputs = janus.image_inputs(codes[:, t : t + 1])
        reference_mask = torch.cat([reference_mask, attended[:, None]], dim=1)
        positions = (reference_mask.cumsum(-1)[:, -1:] - 1).clamp(min=0)
        reference = last_hidden(step_inputs, reference_mask, positions, reference_cache)
        torch.testing.assert_close(fast.step(step_inputs, attended), reference, atol=1e-6, rtol=1e-5)
        assert torch.equal(fast.mask, reference_mask)
    assert [layer.key_buffer.data_ptr() for layer in fast.cache.layers] == storage
    assert fast.cache.layers[0].keys.shape[2] == mask.shape[1] + steps
    with pytest.raises(RuntimeError, match="sized for"):
        fast.step(janus.image_inputs(codes[:, :1]))


@pytest.mark.parametrize("family,tokens,codes", [("emu3", 32 * 33 + 3, 32768), ("chameleon", 1024, 8192),
                                                  ("blip3o_next", 729, 65536)])
def test_mid_sizes_build_the_real_image_length_and_codebook(family, tokens, codes):
    """`--size mid` (hidden 1024, 8 layers) for the families beyond Janus: each one's real image length and
    codebook, and a decode step that runs (a few steps of the engine on the built model)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.rollout import FAMILIES
    finally:
        sys.path.remove(str(ROOT))
    policy = FAMILIES[family].build_size("mid", "cpu", torch.bfloat16)
    assert policy.num_image_tokens == tokens
    hidden = policy.decoder_layers()[0].mlp.gate_proj
    assert (hidden.in_features, hidden.out_features, len(policy.decoder_layers())) == (1024, 2816, 8)
    ids, mask = policy.encode_prompts(PROMPTS[:1])
    logits = policy.image_logits(policy.hidden_states(policy.context_inputs(ids), mask, mask.cumsum(-1) - 1)[:, -1])
    assert logits.shape == (1, codes)


def test_a_bf16_model_on_cpu_decodes_over_a_float32_kv_cache_unless_the_cpu_has_amx(monkeypatch):
    """On a CPU without AMX, bf16 decode steps attend over a float32 copy of the cache (PyTorch's bf16 CPU attention
    is the slower one there): the cache is float32, the model's attention setting is back to sdpa after sampling,
    and the sampled distribution is the bf16 model's (log-probs close to its teacher-forced scoring, tokens as with a
    bf16 cache but for rare last-bit flips). With AMX the cache stays bf16 (the bf16 kernel is the faster one)."""
    import policies.base
    from policies.base import Stream

    policy = policies.build("janus", tiny=True, dtype="bfloat16")
    ids, mask = policy.encode_prompts(PROMPTS)

    def cache_dtype() -> torch.dtype:
        decoder = policy.start_decoder(Stream(*policy.guidance_rows(ids, mask, True), 2), 4)
        decoder.step(policy.image_inputs(torch.zeros(len(decoder.mask), 1, dtype=torch.long)))
        return decoder.cache.layers[0].keys.dtype

    monkeypatch.setattr(policies.base, "cpu_has_amx", lambda: True)
    assert cache_dtype() == torch.bfloat16
    monkeypatch.setattr(policies.base, "cpu_has_amx", lambda: False)
    assert cache_dtype() == torch.float32
    assert policy.model.config.text_config._attn_implementation == "sdpa"
    fast = policy.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(1))
    assert policy.model.config.text_config._attn_implementation == "sdpa"
    gap = (policy.token_logprobs(fast) - fast.logprobs).abs().mean()
    assert gap < 0.05, gap
    policy.half_kv_on_cpu = True
    assert cache_dtype() == torch.bfloat16
    half = policy.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(1))
    assert (fast.completion_ids == half.completion_ids).float().mean() > 0.95
