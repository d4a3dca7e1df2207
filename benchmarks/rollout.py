"""Rollout speed: `policy.sample` against transformers' `generate` on the same model, batch, CFG and sampling settings.

    python benchmarks/rollout.py --policy janus --tiny --batch 8 --group 4 --cfg 5
    python benchmarks/rollout.py --policy janus --size cpu-bench --batch 8 --group 4 --cfg 5
    python benchmarks/rollout.py --policy janus --size Janus-Pro-7B --batch 128 --group 8 --cfg 5 --compile --fit-memory

Prints images/s, tokens/s and peak memory per method, the fraction of the memory-bandwidth roofline (bytes of weights
plus KV cache read per decode step, over the mean step time, over the bandwidth of a large device-to-device copy),
and last `speedup_vs_generate=X.XX` (the fastest `policy.sample` variant over `generate`). On a GPU the methods run
one after the other, each releasing its memory before the next; `--fit-memory` measures the largest batch (halving
the prompts) whose KV cache fits in the GPU's free memory, and the last lines say which (`images=`) and how many
compiled graphs ran without their CUDA graph (`cudagraph_skips=`).

`--ablations` adds what each optimisation buys: the prompt prefilled once per sample instead of once per prompt
(its KV cache shared by the group), and conditional/unconditional rows in two passes instead of one batch.

Adding a family: write its `generate` baseline (same settings as `policy.sample`, returns [N, T] tokens), the
bytes it reads per decode step, optionally its named sizes, and add a `Family` row to FAMILIES.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

import policies
from policies.base import (Stream, decode_compile_mode, position_ids_from_mask, process_logits, run_decoder,
                           sample_from_logits)
from transformers import DynamicCache
from benchmarks.common import (
    FAMILY_MID,
    JANUS_SIZES,
    build_blip3o_next_size,
    build_chameleon_size,
    build_emu3_size,
    build_janus_size,
    cudagraph_skips,
    free_memory,
    machine_name,
    measure_bandwidth,
    param_bytes,
    clock,
    timed_interleaved,
)
from policies.base import Policy, Rollout, SamplingSettings

PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left", "a green apple",
           "a drawing of a house with a tree and a cat", "a sign that says text", "a plain blue background"]


# ----------------------------------------------------------------------------------------------------------------
# Janus


def janus_generate(policy, prompts: list[str], group_size: int, settings: SamplingSettings, seed: int) -> torch.Tensor:
    """transformers' own image loop: `generate(generation_mode="image")`, CFG by `guidance_scale`, with top_k,
    top_p and temperature passed explicitly (its default top_k=50 would truncate; models.md §1 pitfall 1)."""
    model = policy.model
    model.generation_config.generation_kwargs = {"boi_token_id": policy.boi_id}
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = policy.bos_id, policy.pad_id
    ids, mask = policy.encode_prompts(prompts)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=True,
                         guidance_scale=settings.cfg_scale, temperature=settings.temperature, top_k=settings.top_k,
                         top_p=settings.top_p, num_return_sequences=group_size)
    tokens = out if isinstance(out, torch.Tensor) else out.sequences
    expected = (len(prompts) * group_size, policy.num_completion_tokens)
    if tuple(tokens.shape) != expected:
        raise RuntimeError(f"generate returned {tuple(tokens.shape)} tokens, expected {expected}")
    return tokens


def janus_step_bytes(policy, rows: int, context: float) -> float:
    """Bytes a decode step must read: the language model's weights (not its input embedding table, of which one
    row per sequence is read), the image head and aligner, and the KV cache of `rows` sequences of `context`."""
    lm = policy.model.model.language_model
    weights = param_bytes(lm) - param_bytes(lm.embed_tokens)
    weights += param_bytes(policy.model.model.generation_head) + param_bytes(policy.model.model.generation_aligner)
    text = policy.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * rows * text.num_key_value_heads * head_dim * context * policy.dtype.itemsize
    return weights + kv


@torch.no_grad()
def janus_two_pass_sample(policy, prompts: list[str], group_size: int, settings: SamplingSettings,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Ablation: the engine's loop with the conditional and unconditional rows as two streams (two KV caches, two
    LM calls per token) instead of one batch. Same distribution; only the batching differs."""
    ids, mask = policy.encode_prompts(prompts)
    n, steps = len(prompts) * group_size, policy.num_image_tokens
    rows = [ids, policy.unconditional_ids(ids)] if settings.uses_cfg else [ids]
    decoders = [policy.start_decoder(Stream(r, mask, group_size), steps - 1, i) for i, r in enumerate(rows)]
    tokens = torch.empty(n, steps, dtype=torch.long, device=policy.device)
    for t in range(steps):
        logits = [policy.image_logits(decoder.last) for decoder in decoders]
        tokens[:, t], _ = sample_from_logits(
            process_logits(logits[0], logits[1] if len(logits) > 1 else None, settings), generator)
        if t + 1 == steps:
            break
        for decoder in decoders:
            decoder.step(policy.image_inputs(tokens[:, t : t + 1]))
    return tokens


# ----------------------------------------------------------------------------------------------------------------
# Emu3


def emu3_generate(policy, prompts: list[str], group_size: int, settings: SamplingSettings, seed: int) -> torch.Tensor:
    """transformers' `generate` the way the release and HF docs run Emu3: a prefix constraint that allows only
    visual tokens at code positions and forces EOL/EOF/EOI/EOS, and unbatched CFG from `negative_prompt_ids` (its
    own forward and KV cache per step) with `guidance_scale`. Each prompt is repeated G times (no shared prefill)."""
    ids, mask = policy.encode_prompts(prompts)
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    n, prompt_len, num_tokens = ids.shape[0], ids.shape[1], policy.num_completion_tokens
    forced = policy.forced_tokens.tolist()
    visual = list(range(policy.visual_start, policy.visual_start + policy.num_codes))

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        t = input_ids.shape[0] - prompt_len
        return visual if t < num_tokens and forced[t] < 0 else [forced[min(t, num_tokens - 1)]]

    cfg = {}
    if settings.uses_cfg:
        neg_ids, neg_mask = policy.encode_negative_prompt()
        cfg = dict(guidance_scale=settings.cfg_scale, negative_prompt_ids=neg_ids.expand(n, -1),
                   negative_prompt_attention_mask=neg_mask.expand(n, -1))
    torch.manual_seed(seed)
    out = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num_tokens, do_sample=True,
                                temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                prefix_allowed_tokens_fn=allowed, **cfg)
    return out[:, prompt_len:]


def emu3_step_bytes(policy, rows: int, context: float) -> float:
    """The text model's weights without the input embedding table, the visual-token rows of lm_head (all the
    policy's restricted head reads), and the KV cache."""
    text_model = policy.model.model.text_model
    weights = param_bytes(text_model) - param_bytes(text_model.embed_tokens)
    weights += policy.num_codes * policy.model.lm_head.weight.shape[1] * policy.dtype.itemsize
    text = policy.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * rows * text.num_key_value_heads * head_dim * context * policy.dtype.itemsize
    return weights + kv


# ----------------------------------------------------------------------------------------------------------------
# BLIP3o-NEXT


def blip3o_next_generate(policy, prompts: list[str], group_size: int, settings: SamplingSettings,
                         seed: int) -> torch.Tensor:
    """The release's AR side is a Qwen3 causal LM sampling 729 tokens, without CFG: plain `generate` with
    `num_return_sequences=G`, no EOS stop, and (when the policy restricts to image tokens) a prefix constraint to
    the `<I*>` ids. AR-side CFG (in-batch empty-caption rows) has no `generate` equivalent: refused."""
    if settings.uses_cfg:
        raise SystemExit("blip3o_next: transformers' generate has no in-batch CFG; use --cfg 1 (the release's AR "
                         "side samples without CFG)")
    ids, mask = policy.encode_prompts(prompts)
    image_ids = list(range(policy.image_start, policy.image_start + policy.codebook_size))
    constraint = (lambda batch_id, input_ids: image_ids) if policy.restrict_to_image_tokens else None
    torch.manual_seed(seed)
    out = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=policy.num_completion_tokens,
                                min_new_tokens=policy.num_completion_tokens, do_sample=True,
                                temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                num_return_sequences=group_size, prefix_allowed_tokens_fn=constraint)
    return out[:, ids.shape[1]:]


def causal_lm_step_bytes(policy, rows: int, context: float) -> float:
    """A causal LM reading its decoder weights (not the input embeddings), its whole output head, and the KV cache."""
    model = policy.model
    weights = param_bytes(model) - param_bytes(model.get_input_embeddings())
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:  # tied: the head is read
        weights += param_bytes(model.get_output_embeddings())
    text = model.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * rows * text.num_key_value_heads * head_dim * context * policy.dtype.itemsize
    return weights + kv


# ----------------------------------------------------------------------------------------------------------------
# Chameleon / Anole


@torch.no_grad()
def chameleon_plain_loop(policy, prompts: list[str], group_size: int, settings: SamplingSettings,
                         seed: int) -> torch.Tensor:
    """No `generate` can draw a Chameleon image (transformers' forward sets every image-token logit to finfo.min),
    so the baseline is the KV-cache loop a user would write around the model: each prompt repeated per sample, its
    conditional and unconditional (text masked) rows in one batch on transformers' DynamicCache, the full-vocabulary
    `lm_head`, the image columns taken from it, CFG, `multinomial`."""
    ids, mask = policy.encode_prompts(prompts)
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    n, guided = len(ids), settings.uses_cfg
    ids, mask = policy.guidance_rows(ids, mask, guided)
    image_ids = policy._image_ids.to(ids.device)
    cache = DynamicCache(config=policy.model.config)
    torch.manual_seed(seed)
    hidden = run_decoder(policy.model.model, ids, mask, position_ids_from_mask(mask), cache)[:, -1]
    tokens = []
    for t in range(policy.num_image_tokens):
        logits = policy.model.lm_head(hidden)[:, image_ids]
        processed = process_logits(logits[:n], logits[n:] if guided else None, settings)
        tokens.append(image_ids[torch.multinomial(processed.softmax(-1), 1).squeeze(-1)])
        if t + 1 == policy.num_image_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        step = tokens[-1].repeat(len(mask) // n)[:, None]
        hidden = run_decoder(policy.model.model, step, mask, position_ids_from_mask(mask)[:, -1:], cache)[:, -1]
    return torch.stack(tokens, 1)


# ----------------------------------------------------------------------------------------------------------------
# The family table


@dataclass
class Family:
    generate: Callable  # (policy, prompts, group_size, settings, seed) -> [N, T] tokens, through HF generate
    step_bytes: Callable  # (policy, rows, mean context length) -> bytes read per decode step
    build_size: Callable | None = None  # (size, device, dtype) -> policy with random weights
    sizes: dict = field(default_factory=dict)
    # name -> (policy, prompts, group_size, settings, generator) -> tokens; same distribution as sample
    ablations: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "janus": Family(generate=janus_generate, step_bytes=janus_step_bytes, build_size=build_janus_size,
                    sizes=JANUS_SIZES, ablations={"cfg_two_passes": janus_two_pass_sample}),
    "emu3": Family(generate=emu3_generate, step_bytes=emu3_step_bytes, build_size=build_emu3_size,
                   sizes={"mid": FAMILY_MID["emu3"]}),
    "blip3o_next": Family(generate=blip3o_next_generate, step_bytes=causal_lm_step_bytes,
                          build_size=build_blip3o_next_size, sizes={"mid": FAMILY_MID["blip3o_next"]}),
    # chameleon: transformers' Chameleon forward sets every image-token logit to finfo.min, so its generate cannot
    # draw an image; the baseline is a plain KV-cache loop (reported under the name "generate").
    "chameleon": Family(generate=chameleon_plain_loop, step_bytes=causal_lm_step_bytes,
                        build_size=build_chameleon_size, sizes={"mid": FAMILY_MID["chameleon"]}),
}


# ----------------------------------------------------------------------------------------------------------------


def rollout_prompts(count: int) -> list[str]:
    """The benchmark's `count` prompts, PROMPTS in turn."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


def kv_cache_bytes(policy: Policy, family: Family, rows: int, length: int) -> float:
    """Bytes of the KV cache of `rows` sequences of `length` positions (the cache part of the family's step bytes)."""
    return family.step_bytes(policy, rows, length) - family.step_bytes(policy, rows, 0)


def batch_that_fits(policy: Policy, family: Family, batch: int, group: int, cfg: bool, device: torch.device,
                    headroom: float = 1.2) -> int:
    """The largest batch of `batch // group`, then half as many, ... prompts (x `group` images each) whose KV cache
    at the full image length, times `headroom` (activations, logits, the allocator's slack), fits in what `device`
    has free with the model built. One cache is enough: the methods run one at a time (`timed_interleaved`, on a
    GPU in turn)."""
    free, where = free_memory(device)
    prompt_count = batch // group
    while prompt_count >= 1:
        length = policy.encode_prompts(rollout_prompts(prompt_count))[0].shape[1] + policy.num_completion_tokens
        images = prompt_count * group
        need = headroom * kv_cache_bytes(policy, family, images * (2 if cfg else 1), length)
        if need <= free:
            if images != batch:
                print(f"--fit-memory: {batch} images do not fit in {where} ({free / 2**30:.1f} GiB free); "
                      f"measuring {images} ({need / 2**30:.1f} GiB of KV cache with headroom)")
            return images
        prompt_count //= 2
    raise SystemExit(f"--fit-memory: not even one prompt x --group {group} fits in {where} "
                     f"({free / 2**30:.1f} GiB free); use a smaller --group or --size")


def build_policy(args, device: torch.device, dtype: torch.dtype) -> Policy:
    family = FAMILIES[args.policy]
    if args.size is None:
        return policies.build(args.policy, tiny=True, dtype=str(dtype).removeprefix("torch."), device=str(device))
    if family.build_size is None:
        raise SystemExit(f"--size is not available for {args.policy} yet; use --tiny")
    return family.build_size(args.size, str(device), dtype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help=f"one of {', '.join(FAMILIES)}")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="the family's tiny test model (default)")
    which.add_argument("--size", help="a released architecture with random weights, e.g. Janus-Pro-7B")
    parser.add_argument("--batch", type=int, default=8, help="images per rollout (prompts x group)")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (the GRPO group size)")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the static-cache decode step (CUDA graphs on CUDA; inductor's C++ kernels "
                             "on CPU, where a C++ compiler is found), and on CPU the default path's step")
    parser.add_argument("--fit-memory", action="store_true",
                        help="halve --batch (a multiple of --group) until the weights and one rollout's KV cache fit "
                             "in the device's free memory; the batch used is printed as images=N")
    parser.add_argument("--ablations", action="store_true", help="also measure the optimisations one by one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.policy not in FAMILIES:
        raise SystemExit(f"no rollout benchmark for policy {args.policy!r}; available: {', '.join(FAMILIES)}")
    if args.batch % args.group:
        raise SystemExit(f"--batch ({args.batch}) must be a multiple of --group ({args.group})")
    family = FAMILIES[args.policy]
    if args.size is not None and args.size not in family.sizes:
        raise SystemExit(f"unknown --size {args.size!r} for {args.policy}; known: {', '.join(family.sizes)}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    policy = build_policy(args, device, dtype)
    settings = SamplingSettings(args.cfg, args.temperature, args.top_k, args.top_p)
    if args.fit_memory:
        args.batch = batch_that_fits(policy, family, args.batch, args.group, settings.uses_cfg, device)
    prompts = rollout_prompts(args.batch // args.group)
    knobs = dict(cfg_scale=settings.cfg_scale, temperature=settings.temperature, top_k=settings.top_k,
                 top_p=settings.top_p)
    tokens_per_image = policy.num_completion_tokens

    def gen() -> torch.Generator:
        return torch.Generator(device).manual_seed(args.seed)

    def sampler(static_cache: bool, compile_decode: bool = False) -> Callable[[], Rollout]:
        def sample() -> Rollout:  # the engine's decode loop on the chosen path, then back to the default one
            policy.set_decoding(static_cache=static_cache, compile_decode=compile_decode)
            try:
                return policy.sample(prompts, args.group, generator=gen(), **knobs)
            finally:
                policy.set_decoding(static_cache=False)
        return sample

    compiled = args.compile and decode_compile_mode(device) is not None
    methods: dict[str, Callable[[], object]] = {
        "generate": lambda: family.generate(policy, prompts, args.group, settings, args.seed),
        "sample": sampler(static_cache=False),
        "sample_static" + ("_compiled" if compiled else ""): sampler(static_cache=True, compile_decode=compiled),
    }
    if compiled and device.type == "cpu":
        # the default path's step compiled with dynamic sizes: it attends over the positions so far, not the whole
        # buffer (at hidden 1024 on CPU never slower than the eager step, where the static compiled one is). Not on
        # CUDA, where the static path is the one CUDA graphs need and every method costs the GPU suite's time.
        methods["sample_compiled"] = sampler(static_cache=False, compile_decode=True)
    if args.ablations:
        repeated = [p for p in prompts for _ in range(args.group)]

        def prefill_per_sample() -> Rollout:  # every sample its own copy of the prompt: no shared prefill
            policy.set_decoding(static_cache=False)
            return policy.sample(repeated, 1, generator=gen(), **knobs)

        methods["sample_prefill_per_sample"] = prefill_per_sample
        for name, fn in family.ablations.items():
            methods[f"sample_{name}"] = lambda fn=fn: fn(policy, prompts, args.group, settings, gen())

    rows = args.batch * (2 if settings.uses_cfg else 1)
    prompt_len = policy.encode_prompts(prompts)[0].shape[1]
    step_bytes = family.step_bytes(policy, rows, prompt_len + tokens_per_image / 2)
    bandwidth = measure_bandwidth(device)

    print(f"machine: {machine_name(device)}")
    print(f"policy={args.policy} size={args.size or 'tiny'} dtype={str(dtype).removeprefix('torch.')} "
          f"images={args.batch} group={args.group} cfg={settings.cfg_scale} temperature={settings.temperature} "
          f"top_k={settings.top_k} top_p={settings.top_p} tokens_per_image={tokens_per_image} "
          f"params={sum(p.numel() for p in policy.model.parameters()) / 1e6:.1f}M")
    print(f"decode step reads {step_bytes / 2**20:.1f} MiB (weights + mean KV cache); "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    on_gpu = device.type == "cuda"
    print(f"timing: median of {args.repeats} {'consecutive' if on_gpu else 'interleaved'} runs after a warm-up, "
          f"{'wall' if clock(device) is time.perf_counter else 'process CPU'} seconds; peak memory of the warm-up")
    print(f"{'method':<28}{'seconds':>10}{'images/s':>10}{'tokens/s':>12}{'ms/step start':>15}{'end':>8}"
          f"{'peak MiB':>10}{'roofline':>10}")
    results = {}
    layers = policy.decoder_layers()
    # On a GPU each method runs all its rounds in turn and then lets its memory go: the static cache the policy keeps
    # for its CUDA graphs (70 GiB at Janus-Pro-7B, 16 x G 8 with CFG) must not sit beside `generate`'s own cache.
    # The static method comes after `generate` and the default path, so its kept cache meets none of theirs.
    def release(name: str) -> None:  # after a method's last run on a GPU: what it keeps goes back
        policy.release_static_caches()
        torch.cuda.empty_cache()

    timings = timed_interleaved(methods, device, args.repeats, step_module=layers[0] if layers else None,
                                tokens=tokens_per_image, unstamped=tuple(n for n in methods if "compiled" in n),
                                interleave=not on_gpu, release=release if on_gpu else None)
    for name, (seconds, out, peak, step_ms, wall) in timings.items():
        tokens = out.completion_ids if isinstance(out, Rollout) else out
        if tuple(tokens.shape) != (args.batch, tokens_per_image):
            raise RuntimeError(f"{name} produced tokens of shape {tuple(tokens.shape)}")
        roofline = step_bytes / (seconds / tokens_per_image) / bandwidth
        results[name] = dict(seconds=seconds, images_per_s=args.batch / seconds,
                             tokens_per_s=args.batch * tokens_per_image / seconds,
                             peak_mib=peak / 2**20, roofline=roofline, step_ms=step_ms, wall_seconds=wall)
        r = results[name]
        start, end = (f"{step_ms[0]:.1f}", f"{step_ms[1]:.1f}") if step_ms else ("-", "-")
        print(f"{name:<28}{seconds:>10.3f}{r['images_per_s']:>10.2f}{r['tokens_per_s']:>12.0f}{start:>15}{end:>8}"
              f"{r['peak_mib']:>10.0f}{roofline:>10.1%}")
    samplers = [n for n in results if n in ("sample", "sample_static", "sample_static_compiled", "sample_compiled")]
    best = min(samplers, key=lambda n: results[n]["seconds"])
    speedup = results["generate"]["seconds"] / results[best]["seconds"]
    for name in results:
        if name.startswith("sample_") and name not in samplers:
            print(f"{name} costs {results[name]['seconds'] / results['sample']['seconds']:.2f}x sample")
    if clock(device) is not time.perf_counter:  # CPU: the wall clock too (it counts what both threads overlap)
        walls = ", ".join(f"{name} {results[name]['wall_seconds']:.3f}" for name in results)
        print(f"wall seconds: {walls}; wall speedup_vs_generate "
              f"{results['generate']['wall_seconds'] / results[best]['wall_seconds']:.2f}")
    print(f"fastest policy.sample: {best}")
    print(f"images={args.batch}")
    print(f"cudagraph_skips={cudagraph_skips(decode_compile_mode(device) if compiled else None)}")
    print(f"speedup_vs_generate={speedup:.2f}")
    return {"results": results, "best": best, "speedup_vs_generate": speedup}


if __name__ == "__main__":
    main()
