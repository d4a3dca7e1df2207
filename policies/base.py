"""The policy contract and the one sampling/scoring engine that every model family runs on.

A policy samples image tokens (with classifier-free guidance), turns them into pixels and scores its own samples
by teacher forcing. The trainer sees only `Policy.sample`, `Policy.decode` and `Policy.token_logprobs`; all three
are written once, here, as templates over small family hooks:

    sample:          image_contexts (prompts, or prompt + plan) -> sample_image (the one KV-cached decode loop over
                     the family's streams: conditional, unconditional / negative rows) -> Rollout
    token_logprobs:  image_context -> score_image (one teacher-forced forward per stream, the same guided
                     distribution) -> plan span prepended when there is one

A family implements: `encode_prompts`, `guidance_rows` (or `image_streams`, for a separate negative prompt),
`decoder_stack` (its language model's transformers stack, which `hidden_states` runs and the engine's layer
loop steps through), `image_logits` (its image head), optionally `forced_image_tokens`,
`context_inputs` / `image_inputs` (embeddings instead of ids), `image_token_ids` / `image_choice_index` (where its
image codes sit in the vocabulary), `rollout_extras`, and `decode`. Think-then-draw is attached from outside
(`policies/plan.py`, through `set_plan`); the family only provides text hooks (`text_logits`, ...).

The guided, filtered next-token distribution is built by one function, `process_logits`, used by the sampler and
the scorer alike, so that "the distribution sampled from" and "the distribution scored" cannot drift apart.
Release sampling settings live in each family's `default_sampling`; a setting left at None takes that value.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
import logging
import os
import shutil
import types
from typing import Callable, Iterator, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from trl.trainer.utils import selective_log_softmax

log = logging.getLogger(__name__)

CfgMode = Literal["mixture", "conditional"]


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that shapes the token distribution. Applied identically in sampling and scoring.

    `top_k=0`, `top_p=1.0` and `min_p=0.0` mean "off". They are off by default on purpose: transformers' own default
    top-k of 50 silently truncates the distribution, and a truncated distribution gives -inf log-probs to tokens the
    updated policy would still like to move towards. `min_p` (after top-k and top-p, as transformers orders them)
    drops tokens whose probability is below min_p times the most likely one's.
    """

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def override(self, cfg_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None) -> "SamplingSettings":
        """These settings with every value that is not None replaced (None: keep this, e.g. the family default)."""
        given = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return replace(self, **{k: v for k, v in given.items() if v is not None})


@dataclass
class Rollout:
    """A batch of sampled images as token sequences. Rows are samples, N = prompts x group_size, grouped
    contiguously: rows [g * G, (g + 1) * G) belong to prompt g."""

    prompts: list[str]  # [N] the prompt of each row
    group_index: Tensor  # [N] long, which prompt of the batch the row belongs to
    prompt_ids: Tensor  # [N, P] long, left-padded
    prompt_mask: Tensor  # [N, P] long, 0 on padding
    completion_ids: Tensor  # [N, T] long, the generated tokens (family-specific id space)
    action_mask: Tensor  # [N, T] bool, True where the token was the policy's free choice
    logprobs: Tensor  # [N, T] float32, log-prob under the distribution actually sampled from
    sampling: SamplingSettings
    extras: dict = field(default_factory=dict)  # family-specific per-row tensors (same leading dim N)
    # Think-then-draw (policies/plan.py): the first `num_plan_tokens` completion columns are the written plan,
    # padded after its stop token; `plans` is its text per row (for logging and rewards). 0 / None without a plan.
    num_plan_tokens: int = 0
    plans: list[str] | None = None
    # [N, T] int32: how many tokens the sampler's truncation (top-k/top-p, bans) kept at each sampled position, so that
    # scoring keeps the same set (`process_logits(kept=...)`); 0 where nothing was sampled. None: recompute.
    kept: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def plan_ids(self) -> Tensor:
        return self.completion_ids[:, : self.num_plan_tokens]

    @property
    def image_ids(self) -> Tensor:
        return self.completion_ids[:, self.num_plan_tokens :]

    def select(self, index: Tensor | slice) -> "Rollout":
        """Rows `index` of this rollout (used to cut micro-batches)."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = index.to(self.completion_ids.device)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                picked[f.name] = value[index]
            elif isinstance(value, list):  # prompts, plans
                picked[f.name] = [value[i] for i in index.tolist()]
            elif f.name == "extras":
                picked[f.name] = {k: v[index] if isinstance(v, Tensor) else [v[i] for i in index.tolist()]
                                  for k, v in value.items()}
        return replace(self, **picked)


def concat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """Rollouts of one policy and one sampling setting as one; prompts are left-padded (mask 0) to the longest,
    `group_index` is renumbered so that groups stay contiguous and distinct."""
    first = rollouts[0]
    if any(r.sampling != first.sampling or r.num_plan_tokens != first.num_plan_tokens for r in rollouts):
        raise ValueError("only rollouts of the same sampling settings and plan width can be concatenated")
    width = max(r.prompt_ids.shape[1] for r in rollouts)

    def left_pad(t: Tensor) -> Tensor:
        return nn.functional.pad(t, (width - t.shape[1], 0), value=0)

    groups, first_group = [], 0
    for r in rollouts:  # each rollout's contiguous groups, numbered on from the previous rollout's
        local = torch.unique_consecutive(r.group_index, return_inverse=True)[1]
        groups.append(local + first_group)
        first_group += int(local.max()) + 1
    cat = lambda name: torch.cat([getattr(r, name) for r in rollouts])  # noqa: E731
    extras = {}
    for key, value in first.extras.items():
        values = [r.extras[key] for r in rollouts]
        extras[key] = torch.cat(values) if isinstance(value, Tensor) else [v for part in values for v in part]
    return replace(
        first, prompts=[p for r in rollouts for p in r.prompts],
        group_index=torch.cat(groups),
        prompt_ids=torch.cat([left_pad(r.prompt_ids) for r in rollouts]),
        prompt_mask=torch.cat([left_pad(r.prompt_mask) for r in rollouts]),
        completion_ids=cat("completion_ids"), action_mask=cat("action_mask"), logprobs=cat("logprobs"),
        extras=extras, plans=[p for r in rollouts for p in r.plans] if first.plans is not None else None,
        kept=cat("kept") if all(r.kept is not None for r in rollouts) else None)


@dataclass
class PlanBatch:
    """Sampled think-then-draw plans (policies/plan.py), one row per sample."""

    ids: Tensor  # [N, M] the span, pad after the stop token
    written: Tensor  # [N, M] bool, tokens actually written (incl. the stop token)
    logprobs: Tensor  # [N, M] float32, 0 where not written
    texts: list[str]
    kept: Tensor | None = None  # [N, M] int32, see Rollout.kept


@dataclass
class ImageContexts:
    """What the image sampler runs after (`ids`, `mask`, `repeats` samples per row) and the per-sample prompt rows
    the rollout keeps. Without a plan one context per prompt (its prefill shared by the group), with a plan one per
    sample (prompt + its own plan + the image prefix)."""

    prompt_ids: Tensor  # [N, P] one row per sample
    prompt_mask: Tensor
    ids: Tensor  # [N / repeats, C] the contexts
    mask: Tensor
    repeats: int
    plan: PlanBatch | None


@dataclass
class Stream:
    """Rows that decode together on one KV cache: `ids`/`mask` prefilled once, each row continued by `repeats`
    samples. A family's streams hold, in order, the conditional rows and then (with guidance) the unconditional or
    negative rows, so that their outputs concatenated are [cond (N rows); uncond (N rows)]."""

    ids: Tensor
    mask: Tensor
    repeats: int

    @property
    def rows(self) -> int:
        return len(self.ids) * self.repeats


@dataclass
class ImageSample:
    """What `Policy.sample_image` returns: the image span of the rollout."""

    tokens: Tensor  # [N, T] long, vocabulary ids
    free: Tensor  # [N, T] bool, free choices (False: forced, log-prob 0)
    logprobs: Tensor  # [N, T] float32
    extras: dict = field(default_factory=dict)
    kept: Tensor | None = None  # [N, T] int32, see Rollout.kept


# ----------------------------------------------------------------------------------------------------------------
# The one definition of the sampled distribution


def process_logits(cond: Tensor, uncond: Tensor | None, settings: SamplingSettings, kept: Tensor | None = None
                   ) -> Tensor:
    """Guided, tempered, truncated logits, in float32. Masked-out tokens are -inf.

    CFG is applied to raw logits, `u + s (c - u)`, as Janus-Pro and Chameleon do it; a family whose release mixes
    log-softmaxes instead (Emu3) normalises its inputs before calling this.

    `kept` (scoring; one count per row of `cond`, from `kept_counts` at sampling time) replays the sampler's
    truncation: the `kept` most likely tokens stay. Recomputing top-p from teacher-forced logits, which differ from
    the incremental ones in the last bits, would flip a token that sits on the boundary in or out and move every
    log-prob of that step (3.5e-3 was seen at top-p 0.9); replayed, the kept set is the same up to the order of
    exact ties, which does not change the distribution.
    """
    logits = cond.float()
    if uncond is not None and settings.uses_cfg:
        uncond = uncond.float()
        logits = uncond + settings.cfg_scale * (logits - uncond)
    if settings.temperature != 1.0:  # x / 1 is x exactly: skip a pass over [B, V]
        logits = logits / settings.temperature
    if kept is not None and settings.truncates:
        return keep_most_likely(logits, kept)
    if settings.top_k > 0 and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the most likely token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= settings.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if settings.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < settings.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def kept_counts(processed: Tensor) -> Tensor:
    """[B] int32: the tokens a processed distribution [B, V] keeps (its finite logits), for `process_logits(kept=)`."""
    return torch.isfinite(processed).sum(-1, dtype=torch.int32)


def keep_most_likely(logits: Tensor, kept: Tensor) -> Tensor:
    """Logits [..., V] with all but the `kept` [...] largest of each row at -inf (kept 0: the row was not sampled,
    keep all, so that masked-out positions stay finite)."""
    kept = torch.where(kept > 0, kept, logits.shape[-1]).to(logits.device)
    rank = torch.empty_like(logits, dtype=torch.int32).scatter_(
        -1, logits.argsort(dim=-1, descending=True, stable=True),
        torch.arange(logits.shape[-1], dtype=torch.int32, device=logits.device).expand(logits.shape).contiguous())
    return logits.masked_fill(rank >= kept.unsqueeze(-1), float("-inf"))


def truncated_pixels(x: Tensor) -> Tensor:
    """Decoder output in [-1, 1] -> uint8 as the Janus-Pro and Emu3 releases write it: (x + 1) / 2 * 255 in float32,
    clipped to [0, 255] and truncated (numpy's astype / a uint8 array assignment), not rounded."""
    return ((x.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from processed logits [B, V]; returns (tokens [B], log-probs [B]).

    Inverse-CDF sampling: one uniform u per row from `generator`, scaled by the row's total mass, and the first token
    whose cumulative probability exceeds it. The cumulative sum runs in float64, so the sampled distribution is the
    float32 softmax to ~1e-16 a token (a float32 sum over 16k-150k tokens would move mass by up to V x 6e-8). Tokens
    of zero mass (masked to -inf) are never drawn: the search takes the first sum strictly above u.

    Why not `torch.multinomial` (an exponential race, V draws of Exp(1) a row): on CPU `exponential_` costs ~15 ns
    an element, 2.0 ms a step for 8 rows x 16,384 codes against 0.1 ms for this draw (6% of a mid bf16 Janus step;
    20 ms against 2.7 ms at 64 rows). Same distribution (a goodness-of-fit test checks it), other tokens at a seed.

    Nothing here reads a value back from the device, so on CUDA the decode loop never waits for the GPU between
    steps (a check per step is a host sync per step). A row that is not a distribution (NaN or +inf logits, every
    token masked out) gets a NaN log-prob instead; `Policy.sample` checks the rollout's log-probs once, at the end
    (`check_sampled`)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    cumulative = torch.cumsum(logprobs.exp(), dim=-1, dtype=torch.float64)
    u = torch.rand(len(logits), 1, dtype=torch.float64, device=logits.device, generator=generator).mul_(
        cumulative[:, -1:])
    # clamp: a NaN row's search may land past the end; its NaN log-prob reports it
    tokens = torch.searchsorted(cumulative, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def check_sampled(*logprobs: Tensor) -> None:
    """Raise where a sampled log-prob is not finite: that step's logits were not a distribution (see
    `sample_from_logits`; a drawn token's log-prob is otherwise finite). One host sync per tensor, after sampling."""
    if not all(torch.isfinite(part).all() for part in logprobs):
        raise FloatingPointError("non-finite logits while sampling: the model's weights or activations hold NaN/inf "
                                 "(diverged training, or an fp16 overflow)")


def entropy_of_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) over the last dim. Unlike trl's entropy_from_logits it tolerates -inf logits (top-k/top-p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that ignore left padding, so a prompt's samples do not depend on the batch it was padded in."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)



def run_decoder(decoder: nn.Module, inputs: Tensor, mask: Tensor, positions: Tensor, cache=None,
                embeds: bool = False) -> Tensor:
    """Final hidden states [B, L, D] of a transformers decoder stack on ids (or embeddings, with `embeds`), with
    the positions given (from the mask), updating `cache` when given."""
    return decoder(**{"inputs_embeds" if embeds else "input_ids": inputs}, attention_mask=mask, position_ids=positions,
                   cache=cache, use_cache=cache is not None).last_hidden_state


def rows_below(ids: Tensor, mask: Tensor, below_ids: Tensor, below_mask: Tensor, pad_id: int
               ) -> tuple[Tensor, Tensor]:
    """`ids`/`mask` [B, L] with `below_ids`/`below_mask` [B, Q] (or one row [1, Q], copied under each row) below
    them, both left-padded (`pad_id`, mask 0) to one width: batched guidance rows. Positions come from the mask, so
    the padding shifts nothing."""
    width = max(ids.shape[1], below_ids.shape[1])

    def left_pad(t: Tensor, value: int) -> Tensor:
        return nn.functional.pad(t.expand(len(ids), -1), (width - t.shape[1], 0), value=value)

    return (torch.cat([left_pad(ids, pad_id), left_pad(below_ids, pad_id)]),
            torch.cat([left_pad(mask, 0), left_pad(below_mask, 0)]))


def check_cfg_mode(cfg_mode: str) -> None:
    if cfg_mode not in ("mixture", "conditional"):
        raise ValueError(f"cfg_mode must be 'mixture' or 'conditional', got {cfg_mode!r}")


def draw_seeds(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One seed per row from the sampling generator (for a decoder's noise), so a rollout decodes reproducibly."""
    seed_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (n,), generator=generator, device=seed_device).to(device)


# ----------------------------------------------------------------------------------------------------------------
# The decode loop's KV cache


FLOAT32_KV_ATTENTION = "grpo_img_sdpa_float32_kv"


def _sdpa_float32_kv(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' SDPA attention for a KV cache kept in float32 beside a bf16/fp16 model: the query is cast up and
    the output back. Used only by the CPU decode step (`CachedDecoder`) on CPUs without AMX, where PyTorch's bf16
    attention kernel at q_len 1 ran 3x slower than the float32 one over twice the bytes (16 x 16 heads x 509
    positions: 17.0 ms against 5.4 ms, 2 threads): the float32 cache is the faster one even though it reads more
    (with AMX it is not: `cpu_has_amx`)."""
    if key.dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query.to(key.dtype), key, value, attention_mask, **kwargs)
    return out.to(query.dtype), weights


@functools.cache  # the CPU does not change: probe once, not at every rollout's decoder start
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later). PyTorch's CPU flash-attention kernel runs bf16
    on them (brgemm), and there the bf16 cache is the faster one at q_len 1: 16 rows x 16 heads x 600 positions,
    0.90 ms against 1.65 ms for float32 (2 threads); a mid Janus bf16 rollout took 20.6 s with a bf16 cache against
    25.6 s with the float32 one. Without AMX (an AMD EPYC with AVX512-BF16; an Intel Xeon without either) the bf16
    kernel was the slower one (3x at 509 positions), hence the float32 cache there."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but the only probe PyTorch offers
    return bool(probe is not None and probe())


AttentionInterface.register(FLOAT32_KV_ATTENTION, _sdpa_float32_kv)
AttentionMaskInterface.register(FLOAT32_KV_ATTENTION, sdpa_mask)


@functools.cache  # PATH is searched once, not at every rollout's decoder start
def cpp_compiler_found() -> bool:
    """Whether inductor can build CPU kernels here: a C++ compiler on PATH (`$CXX`, else g++ / clang++ / c++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return any(shutil.which(name) for name in names)


def decode_compile_mode(device: torch.device, static: bool = True) -> str | None:
    """The torch.compile mode of a compiled decode step on `device`: on CUDA "reduce-overhead" (CUDA graphs) for the
    static-cache step, whose shapes are fixed, and inductor's "default" for the default path's step, whose cache
    length grows every step (a graph per length would be recorded); on CPU "default" (C++ kernels) where a C++
    compiler is found; else None (the step stays eager)."""
    if device.type == "cuda":
        return "reduce-overhead" if static else "default"
    return "default" if device.type == "cpu" and cpp_compiler_found() else None


@contextlib.contextmanager
def float32_kv_attention(config) -> Iterator[None]:
    """The model whose attention layers read `config` attends with `_sdpa_float32_kv` inside the block (it was
    "sdpa"; anything else is left alone)."""
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    config._attn_implementation = FLOAT32_KV_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that grows in place: keys and values are views of the first `length` positions of buffers
    allocated once for the whole image. transformers' `DynamicLayer` grows by `torch.cat`, a copy of the layer's
    whole cache on every step (at 64 rows x 600 positions x hidden 1024, about 2.5 GB read and written per step over
    8 layers, measured as 28% of a decode step at the start of an image and growing with the context); here a step
    writes only its own column. Attention reads exactly what the dynamic layer would hand it (the same values, the
    same length), so sampling is unchanged. With `dtype` float32 under a bf16/fp16 model the buffers hold the same
    values exactly, cast up (see `_sdpa_float32_kv`).

    The buffers are zero-filled when made, not left empty: a step's column lands on every row's block of the buffer,
    so an untouched buffer page-faults a few pages a step, scattered (measured 0.2-0.3 ms a write, against 0.02 ms
    once the pages exist: 16 rows, hidden 1024, 8 layers); the fill takes those faults once, in one pass."""

    def __init__(self, layer: DynamicLayer, capacity: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rows, heads, length, _ = layer.keys.shape
        self.key_buffer = layer.keys.new_zeros(rows, heads, capacity, layer.keys.shape[-1], dtype=dtype)
        self.value_buffer = layer.values.new_zeros(rows, heads, capacity, layer.values.shape[-1], dtype=dtype)
        self.key_buffer[:, :, :length] = layer.keys
        self.value_buffer[:, :, :length] = layer.values
        self.device, self.is_initialized, self.length = layer.keys.device, True, length
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions asked of a cache sized {self.key_buffer.shape[2]}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


# transformers decoder stacks whose forward, at a decode step, is only: embeddings (unless fed them) -> one attention
# mask for every layer -> rotary position embeddings -> each decoder layer -> the final norm (read in each class's
# forward, transformers 5.x). `layer_loop` calls their layers directly.
LAYER_LOOP_STACKS = frozenset({"LlamaModel", "Emu3TextModel", "ChameleonModel", "Qwen2Model", "Qwen3Model"})


def layer_loop(stack: nn.Module, embeds: bool) -> Callable[..., Tensor] | None:
    """A decode step `(inputs, mask, positions, cache) -> last hidden [rows, D]` through `stack`'s own layers,
    without the stack's forward; None where `stack` is not one of `LAYER_LOOP_STACKS` attending with SDPA over full
    attention only (then the engine runs the stack's forward).

    Why: at a decode step the forward's own work (building the 4-D mask from the 2-D one, output records, argument
    checks and decorators) cost as much as two tiny layers (1.37 -> 0.88 ms a step, 16 rows, hidden 64). Here the
    mask for one query at the end of the cache is the padding mask itself (causality hides nothing), in SDPA's
    boolean form as transformers' `sdpa_mask` builds it, or None when every position is attended, as there. On the
    static cache the query is not at the end of the buffer, and the full-length mask's zeros at the positions not
    yet written hide what causality would (static eager 1.53 -> 1.29 ms a step, compiled 0.98 -> 0.93, tiny Janus). The
    layers, rotary embedding and norm are the model's modules (LoRA-wrapped or not), so the hidden states are
    bitwise the forward's (tested per family)."""
    config = getattr(stack, "config", None)
    if (type(stack).__name__ not in LAYER_LOOP_STACKS or not type(stack).__module__.startswith("transformers.")
            or config._attn_implementation != "sdpa"
            or any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())):
        return None
    layers = list(stack.layers[: config.num_hidden_layers])

    def step(inputs: Tensor, mask: Tensor | None, positions: Tensor, cache) -> Tensor:
        hidden = inputs if embeds else stack.embed_tokens(inputs)
        attend = None if mask is None else mask.bool()[:, None, None, :]
        rotary = stack.rotary_emb(hidden, position_ids=positions)
        for layer in layers:
            out = layer(hidden, attention_mask=attend, position_ids=positions, cache=cache, use_cache=True,
                        position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out  # Chameleon's layers return a tuple
        return stack.norm(hidden)[:, -1]

    return step


class CachedDecoder:
    """Rows that decode one token at a time on a KV cache. Each context row is prefilled once and its cache shared
    by the `repeats` samples drawn from it (rows [i * repeats, (i + 1) * repeats) continue context row i).

    `forward(inputs, mask, positions, cache)` runs the family's model and returns its output at the last position
    ([rows, ...]). Positions come from the mask, so left padding and masked columns shift nothing.

    By default the prefilled cache moves into buffers sized for prompt + `max_new_tokens` (`PreallocatedLayer`), and
    the attention mask into one such buffer: a step writes one column and attends over the positions so far, with
    no copy of the cache. With `static` (a transformers `StaticCache` of that length) every step instead has fixed
    shapes (a full-length mask written in place, attention over the whole buffer), which is what lets a compiled
    `step_forward` replay as one CUDA graph. All paths feed the model the same sequence; the golden test checks that
    they sample the same tokens.

    On the default path `step_forward` (default: `forward`) is given the mask of the positions so far, or None while
    every position is attended (no padding in the prompts, no `attended` zeros).
    """

    def __init__(self, forward: Callable[..., Tensor], inputs: Tensor, mask: Tensor, repeats: int, cache,
                 static=None, max_new_tokens: int = 0, step_forward: Callable[..., Tensor] | None = None,
                 float32_kv_config=None) -> None:
        self.forward, self.cache = forward, cache
        # the config of the attention layers, when the steps attend over a float32 cache (`_sdpa_float32_kv`)
        self.float32_kv_config = float32_kv_config if static is None else None
        self.step_forward = step_forward or forward
        last = forward(inputs, mask, position_ids_from_mask(mask), cache)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        self.last = last.repeat_interleave(repeats, 0)
        mask = mask.repeat_interleave(repeats, 0)
        # attended tokens so far per row: the next fed token's position is this count (positions = cumsum - 1)
        self.count = mask.long().sum(-1, keepdim=True)
        self.padded = not bool(mask.all())
        self.static = static is not None
        prompt_len = mask.shape[1]
        self.length = prompt_len
        self.full_mask = mask.new_zeros(len(mask), prompt_len + max_new_tokens)
        self.full_mask[:, :prompt_len] = mask
        if self.static:
            for static_layer, layer in zip(static.layers, cache.layers):
                if not static_layer.is_initialized:
                    static_layer.lazy_initialization(layer.keys, layer.values)
                static_layer.keys[:, :, :prompt_len] = layer.keys
                static_layer.values[:, :, :prompt_len] = layer.values
                static_layer.cumulative_length.fill_(prompt_len)
            self.cache = static
        else:
            kv_dtype = torch.float32 if self.float32_kv_config is not None else None
            cache.layers = [PreallocatedLayer(layer, prompt_len + max_new_tokens, kv_dtype)
                            if type(layer) is DynamicLayer and layer.is_initialized else layer
                            for layer in cache.layers]

    @property
    def mask(self) -> Tensor:
        """[rows, L] the attention mask: the whole buffer on the static path, the positions so far otherwise."""
        return self.full_mask if self.static else self.full_mask[:, : self.length]

    def step(self, inputs: Tensor, attended: Tensor | None = None) -> Tensor:
        """Feed one token per row (`attended` [rows]: 0 where the fed token must stay unseen, e.g. padding after a
        row has finished) and return the new output at the last position."""
        if self.length >= self.full_mask.shape[1]:
            raise RuntimeError(f"decoder stepped past the {self.full_mask.shape[1]} positions it was sized for")
        column = self.full_mask[:, self.length]
        if attended is None:
            column.fill_(1)
            self.count += 1
        else:
            column.copy_(attended)
            self.count += attended.long()[:, None]
            self.padded = True
        self.length += 1
        positions = (self.count - 1).clamp(min=0)
        if self.static:
            # clone: a CUDA-graph replay overwrites its output buffer on the next call
            self.last = self.step_forward(inputs, self.full_mask, positions, self.cache).clone()
        else:
            mask = self.mask if self.padded else None
            float32_kv = self.float32_kv_config is not None
            with float32_kv_attention(self.float32_kv_config) if float32_kv else contextlib.nullcontext():
                self.last = self.step_forward(inputs, mask, positions, self.cache)
        return self.last


# ----------------------------------------------------------------------------------------------------------------
# The contract, and the engine written once


class Policy(ABC):
    """A token-level image policy. The trainer uses `sample`, `decode`, `token_logprobs`, the LoRA helpers and
    `save_pretrained`; a family implements the hooks below (see the module docstring)."""

    name: str = ""
    #: LoRA targets: names or a regex over module names, language model only.
    lora_target_modules: list[str] | str = []
    #: Image heads trained in full next to LoRA (peft `modules_to_save`), where the family has them.
    modules_to_save: list[str] = []
    #: Number of tokens in one image (the image span of the completion).
    num_image_tokens: int = 0
    #: False where every image token is forced (SEED-X): then only a plan can be trained.
    free_image_tokens: bool = True
    #: False where guidance lives outside the token distribution (SEED-X guides its diffusion de-tokenizer).
    token_cfg: bool = True
    #: The family's sampling of image tokens; every setting a caller leaves at None takes this value. It is the
    #: release's, except where truncation would give the trained policy -inf log-probs (see `release_sampling`).
    default_sampling: SamplingSettings = SamplingSettings()
    #: The release's own inference sampling where it differs from `default_sampling` (None: it does not).
    release_sampling: SamplingSettings | None = None
    #: Think-then-draw settings and the planner attached by `set_plan` (policies/plan.py); None: no plan.
    plan = None
    planner = None
    #: Side of the decoded square image in pixels.
    image_size: int = 0
    #: Scoring applies the image head to this many positions at a time, under activation checkpointing when
    #: gradients are on (only hidden states are kept for backward); None: all positions at once.
    score_chunk_size: int | None = None
    #: Decode on a preallocated StaticCache; compile the decode step of the path chosen (`_step_function`: CUDA
    #: graphs for the static path on CUDA).
    static_cache: bool = False
    compile_decode: bool = False
    #: A bf16/fp16 model on CPU decodes over a float32 KV cache (faster there, `_sdpa_float32_kv`), except bf16 on a
    #: CPU with AMX (`cpu_has_amx`); True always keeps the cache in the model's dtype.
    half_kv_on_cpu: bool = False
    #: Decode steps call the language model's layers directly (`layer_loop`) where its stack allows; False always
    #: runs the stack's forward.
    layer_loop: bool = True
    #: The stack `decoder_stack` returns is fed embeddings (`context_inputs` / `image_inputs`), not ids.
    stack_takes_embeds: bool = False
    #: True where `decode` runs the language model itself (BLIP3o-NEXT: its hidden states drive the diffusion
    #: decoder): the trainer then never decodes beside sampling in another thread (`rollout_chunks`).
    decode_reads_language_model: bool = False
    #: Every process must run the same forwards (FSDP-sharded layers: a forward is a collective), so a loop that
    #: may stop early (the plan sampler) stops only when every process is done (set by the trainer's sharding).
    lockstep: bool = False

    model: nn.Module
    peft_model: nn.Module | None = None

    # -- hooks every family implements --------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The family's image-generation prompts (ending where the first image token follows), left-padded."""

    @property
    @abstractmethod
    def decoder_stack(self) -> nn.Module | None:
        """The transformers decoder model (embeddings, layers, final norm) of the language model: `hidden_states`
        runs it, and the engine's `layer_loop` calls its layers. None for a family that overrides `hidden_states`
        with something else (its decode steps then run `hidden_states`)."""

    def hidden_states(self, inputs: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        """Final hidden states [B, L, D] of the language model on `inputs` (ids, or what `context_inputs` /
        `image_inputs` make of them, with `stack_takes_embeds`), updating `cache` when given."""
        return run_decoder(self.decoder_stack, inputs, mask, positions, cache, embeds=self.stack_takes_embeds)

    @abstractmethod
    def image_logits(self, hidden: Tensor) -> Tensor:
        """The image head: logits [..., K] over the image choices (index k is `image_token_ids(k)`)."""

    @abstractmethod
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        """Tokens to pixels, the whole way, no grad, micro-batched."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Save weights and tokenizer/processor so that `build(name, model_name_or_path=path)` loads them back."""

    # -- hooks with defaults ------------------------------------------------------------------------------------

    @property
    def cache_config(self):
        """The config the KV caches are built from."""
        return self.model.config

    def guidance_rows(self, ids: Tensor, mask: Tensor, guided: bool) -> tuple[Tensor, Tensor]:
        """The conditional rows and, when `guided`, the unconditional rows below them (same width)."""
        if guided:
            raise NotImplementedError(f"{self.name}: guidance_rows must build the unconditional rows")
        return ids, mask

    def image_streams(self, ids: Tensor, mask: Tensor, repeats: int, guided: bool) -> list[Stream]:
        """The rows the sampler decodes: by default one stream holding `guidance_rows`."""
        return [Stream(*self.guidance_rows(ids, mask, guided), repeats)]

    def scoring_streams(self, rollout: Rollout, ids: Tensor, mask: Tensor, guided: bool) -> list[Stream]:
        """The same rows for teacher forcing, one context per sample."""
        return self.image_streams(ids, mask, 1, guided)

    def context_inputs(self, ids: Tensor) -> Tensor:
        """What the language model reads for context ids (default: the ids; Janus: their embeddings)."""
        return ids

    def image_inputs(self, tokens: Tensor) -> Tensor:
        """What the language model reads for image tokens already drawn."""
        return tokens

    def image_token_ids(self, index: Tensor) -> Tensor:
        """Index into `image_logits` -> the token ids the rollout holds."""
        return index

    def image_choice_index(self, token_ids: Tensor) -> Tensor:
        """The inverse of `image_token_ids`."""
        return token_ids

    @property
    def forced_image_tokens(self) -> Tensor | None:
        """[T] long: the token forced at each image position, -1 where the policy chooses; None: all free."""
        return None

    def check_image_tokens(self, image_ids: Tensor) -> None:
        """Raise if a completion does not follow the family's layout."""

    def rollout_extras(self, n: int, generator: torch.Generator | None) -> dict:
        """Per-row tensors the rollout carries (drawn after the tokens, so they never change the tokens)."""
        return {}

    # -- think-then-draw text hooks (used by policies/plan.py's Planner) ---------------------------------------

    @property
    def plan_refusal(self) -> str | None:
        """Why this policy cannot write a plan (None: it can). By default: the family lacks the text hooks below."""
        if type(self).text_logits is Policy.text_logits:
            return "it lacks the text hooks of think-then-draw (text_logits, plan_prompt_text, image_prefix_ids)"
        return None

    plan_tokenizer = None  #: the text tokenizer (left padding, adds BOS)
    default_plan_end_marker: str | None = None  #: the plan's end marker when none is configured; None: EOS

    def plan_prompt_text(self, request: str) -> str:
        """The family's prompt around the plan-writing request, ending where the plan starts."""
        raise NotImplementedError

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        """Text-head logits [B, L, V] of the language model (updating `cache` when given)."""
        raise NotImplementedError

    @property
    def image_prefix_ids(self) -> list[int]:
        """Tokens between the plan and the image; the first is begin-of-image, which also stops a plan."""
        raise NotImplementedError

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
        """Token ids a plan may not write (image-only tokens, ...); never the end marker."""
        return []

    def encode_plan_requests(self, requests: list[str]) -> tuple[Tensor, Tensor]:
        """The plan-writing prompts, left-padded."""
        batch = self.plan_tokenizer([self.plan_prompt_text(r) for r in requests], padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # -- the template: sample ----------------------------------------------------------------------------------

    def sampling_settings(self, cfg_scale: float | None = None, temperature: float | None = None,
                          top_k: int | None = None, top_p: float | None = None,
                          min_p: float | None = None) -> SamplingSettings:
        """The family's release settings with the given values put in."""
        settings = self.default_sampling.override(cfg_scale, temperature, top_k, top_p, min_p)
        if settings.uses_cfg and not self.token_cfg and not getattr(self, "_warned_cfg", False):
            log.warning("%s: cfg_scale=%s has no effect (the family has no token-level guidance)", self.name,
                        settings.cfg_scale)
            self._warned_cfg = True
        return settings

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, *, cfg_scale: float | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, generator: torch.Generator | None = None) -> Rollout:
        """Sample `group_size` images per prompt (no grad). Settings left at None are the family's release ones
        (`default_sampling`)."""
        settings = self.sampling_settings(cfg_scale, temperature, top_k, top_p, min_p)
        contexts = self.image_contexts(prompts, group_size, generator)
        image = self.sample_image(contexts.ids, contexts.mask, contexts.repeats, settings, generator)
        check_sampled(image.logprobs, *([contexts.plan.logprobs] if contexts.plan is not None else []))
        extras = {**image.extras, **self.rollout_extras(len(contexts.prompt_ids), generator)}
        return self.make_rollout(prompts, group_size, contexts, image, settings, extras)

    def image_contexts(self, prompts: list[str], group_size: int, generator: torch.Generator | None
                       ) -> ImageContexts:
        """Without a plan, one context per prompt: prefilled once, its KV cache shared by the group's samples.
        With a plan, the planner writes one per sample (prompt + plan + image prefix)."""
        if self.planner is not None:
            return self.planner.image_contexts(prompts, group_size, generator)
        ids, mask = self.encode_prompts(prompts)
        return ImageContexts(ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0),
                             ids, mask, group_size, None)

    def image_context(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """The context the image tokens were sampled after, one row per sample: the prompt, or prompt + plan +
        image prefix."""
        if rollout.num_plan_tokens == 0:
            return rollout.prompt_ids, rollout.prompt_mask
        return self.planner.plan_context(rollout.prompt_ids, rollout.prompt_mask, rollout.plan_ids)

    def sample_image(self, ids: Tensor, mask: Tensor, repeats: int, settings: SamplingSettings,
                     generator: torch.Generator | None) -> ImageSample:
        """The one decode loop: the image span after each context row, `repeats` samples per row. Every stream is
        prefilled once; at a free position the guided distribution over the image head is sampled, a forced
        position takes its token; every stream is then fed the token. Nothing is run after the last free
        position (what follows is forced)."""
        n, steps = len(ids) * repeats, self.num_image_tokens
        guided = settings.uses_cfg and self.token_cfg
        forced = self.forced_image_tokens
        forced = forced.to(self.device) if forced is not None else torch.full((steps,), -1, device=self.device)
        free = forced < 0
        last_free = int(free.nonzero().max())
        decoders = [self.start_decoder(stream, last_free, index)
                    for index, stream in enumerate(self.image_streams(ids, mask, repeats, guided))]
        tokens = forced.repeat(n, 1)
        logprobs = torch.zeros(n, steps, dtype=torch.float32, device=self.device)
        kept = torch.zeros(n, steps, dtype=torch.int32, device=self.device)
        is_free = free.tolist()  # a Python list: no device sync per step
        for t in range(last_free + 1):
            if is_free[t]:
                logits = [self.image_logits(decoder.last) for decoder in decoders]
                logits = logits[0] if len(logits) == 1 else torch.cat(logits)
                processed = process_logits(logits[:n], logits[n:] if guided else None, settings)
                index, logprobs[:, t] = sample_from_logits(processed, generator)
                tokens[:, t] = self.image_token_ids(index)
                if settings.truncates:
                    kept[:, t] = kept_counts(processed)
            if t == last_free:
                break
            for decoder in decoders:
                decoder.step(self.image_inputs(tokens[:, t : t + 1].repeat(len(decoder.mask) // n, 1)))
        return ImageSample(tokens, free.expand(n, -1).clone(), logprobs, kept=kept)

    def start_decoder(self, stream: Stream, max_new_tokens: int, index: int = 0) -> CachedDecoder:
        """Prefill `stream` on a fresh cache (a reused StaticCache with `static_cache`). Decode steps run through
        the stack's layers (`layer_loop`) where it allows, on either cache; else through the stack's forward."""
        def last_hidden(inputs, mask, positions, cache):
            return self.hidden_states(inputs, mask, positions, cache)[:, -1]

        inputs = self.context_inputs(stream.ids)
        prefill = DynamicCache(config=self.cache_config)
        stack = self.decoder_stack if self.layer_loop else None
        step = (layer_loop(stack, self.stack_takes_embeds) if stack is not None else None) or last_hidden
        if not self.static_cache:
            return CachedDecoder(last_hidden, inputs, stream.mask, stream.repeats, prefill,
                                 max_new_tokens=max_new_tokens, step_forward=self._step_function(step, static=False),
                                 float32_kv_config=self.float32_kv_config())
        length = stream.ids.shape[1] + max_new_tokens
        return CachedDecoder(last_hidden, inputs, stream.mask, stream.repeats, prefill,
                             static=self._reusable_static_cache(index, stream.rows, length),
                             max_new_tokens=max_new_tokens, step_forward=self._step_function(step, static=True))

    def float32_kv_config(self):
        """The attention layers' shared config when the decode loop keeps its KV cache in float32 (a bf16/fp16 model
        on CPU, attending with SDPA; see `_sdpa_float32_kv`), else None (and always None with `half_kv_on_cpu`, or
        for bf16 on a CPU with AMX, where the bf16 kernel is the faster one: `cpu_has_amx`)."""
        if self.device.type != "cpu" or self.dtype not in (torch.bfloat16, torch.float16) or self.half_kv_on_cpu:
            return None
        if self.dtype == torch.bfloat16 and cpu_has_amx():
            return None
        configs = {id(getattr(getattr(layer, "self_attn", None), "config", None)): layer for layer in
                   self.decoder_layers()}
        if len(configs) != 1 or None in [getattr(layer, "self_attn", None) for layer in configs.values()]:
            return None  # layers of unknown layout or with several configs: keep the model's dtype
        config = next(iter(configs.values())).self_attn.config
        return config if config._attn_implementation == "sdpa" else None

    def _reusable_static_cache(self, index: int, rows: int, length: int):
        """One StaticCache per (stream, rows, length, dtype, device), kept on the policy: its tensors are the static
        addresses a captured CUDA graph reads, so a new cache per rollout would force a new capture."""
        caches = self.__dict__.setdefault("_static_caches", {})
        key = (index, rows, length, self.dtype, self.device)
        if key not in caches:
            if len(caches) >= 4:  # shapes keep changing (batch or plan length): do not hoard old caches
                caches.clear()
            caches[key] = StaticCache(config=self.cache_config, max_cache_len=length)
        else:
            caches[key].reset()  # zeros the tensors in place and rewinds the length
        return caches[key]

    def release_static_caches(self) -> None:
        """Drop the static caches kept for the next static-path rollout. They hold the whole KV cache of the last
        rollout's shape between rollouts (at Janus-Pro-7B, 16 prompts x G 8 with CFG: 70 GiB), which is what a
        captured CUDA graph needs; after this the next static rollout allocates its cache anew, and on CUDA
        captures anew."""
        self.__dict__.pop("_static_caches", None)

    def _step_function(self, step: Callable[..., Tensor], static: bool) -> Callable[..., Tensor]:
        """The decode step: `step` itself, or with `compile_decode` compiled once per policy and path in
        `decode_compile_mode`, eager with a warning where that is None.

        The static path's step has fixed shapes (the static cache, the full-length mask): on CUDA it replays as CUDA
        graphs. The default path's step is compiled with dynamic sizes (`dynamic=True`: the cache length grows every
        step), and keeps attending over the positions written so far; on CPU that is the faster compiled step at
        hidden 1024, the static one on tiny models (docs/performance.md, "A fourth CPU ... and the compiled default
        step")."""
        if not self.compile_decode:
            return step
        mode = decode_compile_mode(self.device, static)
        if mode is None:
            if not getattr(self, "_warned_compile", False):
                log.warning("%s: compile_decode needs CUDA, or a C++ compiler on CPU; decoding eagerly on %s",
                            self.name, self.device)
                self._warned_compile = True
            return step
        # one per mode, path and kind of step: a policy moved to CUDA gets its CUDA graphs, `layer_loop` off its
        # forward; switching between the paths does not recompile either
        key = (mode, static, self.layer_loop)
        compiled = self.__dict__.setdefault("_compiled_steps", {})
        if key not in compiled:
            # compile a copy of `step` with a code object of its own: dynamo keeps at most `recompile_limit` (8)
            # compiled entries per code object, and every policy's step is the same function (the layer loop's
            # closure), so the policies and paths compiled in one process would share those entries and, once they
            # are full, silently decode eagerly
            own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                                     step.__closure__)
            compiled[key] = torch.compile(own, mode=mode, fullgraph=False, dynamic=None if static else True)
        return compiled[key]

    def set_decoding(self, static_cache: bool | None = None, compile_decode: bool = False,
                     layer_loop: bool | None = None, half_kv_on_cpu: bool | None = None) -> None:
        """The decode loop's speed options for every family (see the class attributes of the same names).
        `compile_decode` compiles the step of the chosen path; `static_cache` left at None follows it (compiling
        chooses the static cache, the CUDA-graph path), and `static_cache=False, compile_decode=True` compiles the
        default path's step. `layer_loop` and `half_kv_on_cpu` left at None keep their current values."""
        self.static_cache = compile_decode if static_cache is None else static_cache
        self.compile_decode = compile_decode
        if layer_loop is not None:
            self.layer_loop = layer_loop
        if half_kv_on_cpu is not None:
            self.half_kv_on_cpu = half_kv_on_cpu

    def make_rollout(self, prompts: list[str], group_size: int, contexts: ImageContexts, image: ImageSample,
                     settings: SamplingSettings, extras: dict) -> Rollout:
        """A rollout with or without a plan span in front of the image span."""
        completion, action, logprobs, width, texts = image.tokens, image.free, image.logprobs, 0, None
        kept = image.kept if image.kept is not None else torch.zeros_like(image.tokens, dtype=torch.int32)
        plan = contexts.plan
        if plan is not None:
            completion = torch.cat([plan.ids, image.tokens], dim=1)
            action = torch.cat([plan.written & self.plan.train_plan, image.free & self.plan.train_image], dim=1)
            logprobs = torch.cat([plan.logprobs, image.logprobs], dim=1)
            width, texts = plan.ids.shape[1], plan.texts
            kept = torch.cat([plan.kept if plan.kept is not None else torch.zeros_like(plan.ids, dtype=torch.int32),
                              kept], dim=1)
        return Rollout(
            prompts=[p for p in prompts for _ in range(group_size)],
            group_index=torch.arange(len(prompts), device=self.device).repeat_interleave(group_size),
            prompt_ids=contexts.prompt_ids, prompt_mask=contexts.prompt_mask, completion_ids=completion,
            action_mask=action, logprobs=logprobs, sampling=settings, extras=extras, num_plan_tokens=width,
            plans=texts, kept=kept,
        )

    # -- the template: score ------------------------------------------------------------------------------------

    def token_logprobs(self, rollout: Rollout, cfg_mode: CfgMode = "mixture", return_entropy: bool = False,
                       entropy_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced log-probs [N, T] of the rollout's tokens, with grad: the image span under the
        distribution it was sampled from (`"mixture"`) or the conditional logits alone (`"conditional"`), and the
        plan span in front when there is one. With `return_entropy`, also the entropy [N, T] of the scored
        distribution (detached, unless `entropy_grad`: for an entropy bonus). Forced tokens score exactly 0."""
        check_cfg_mode(cfg_mode)
        self.check_image_tokens(rollout.image_ids)
        guided = cfg_mode == "mixture" and rollout.sampling.uses_cfg and self.token_cfg
        context_ids, context_mask = self.image_context(rollout)
        logprobs, entropy = self.score_image(rollout, context_ids, context_mask, guided, return_entropy,
                                             entropy_grad)
        if rollout.num_plan_tokens:
            plan_logprobs, plan_entropy = self.planner.plan_logprobs(rollout, entropy_grad)
            logprobs = torch.cat([plan_logprobs, logprobs], dim=1)
            entropy = torch.cat([plan_entropy, entropy], dim=1) if return_entropy else None
        return (logprobs, entropy) if return_entropy else logprobs

    def score_image(self, rollout: Rollout, context_ids: Tensor, context_mask: Tensor, guided: bool,
                    return_entropy: bool, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probs (and entropies) [N, T] of the image span: one teacher-forced forward per stream, the hidden
        states that predict the free positions, the image head in chunks."""
        image_ids = rollout.image_ids
        n, steps = image_ids.shape
        forced = self.forced_image_tokens
        free = (forced < 0).nonzero().flatten().to(image_ids.device) if forced is not None else \
            torch.arange(steps, device=image_ids.device)
        last_free = int(free[-1])
        all_free = len(free) == steps  # then plain slices, not gathers (no copy, a cheaper backward)
        hidden = []
        for stream in self.scoring_streams(rollout, context_ids, context_mask, guided):
            ids = stream.ids.repeat_interleave(stream.repeats, 0)
            mask = stream.mask.repeat_interleave(stream.repeats, 0)
            previous = image_ids[:, :last_free].repeat(len(ids) // n, 1)
            inputs = torch.cat([self.context_inputs(ids), self.image_inputs(previous)], dim=1)
            attn = torch.cat([mask, mask.new_ones(previous.shape)], dim=1)
            # the hidden state at position P-1+t predicts image token t
            states = self.hidden_states(inputs, attn, position_ids_from_mask(attn))
            start = ids.shape[1] - 1
            hidden.append(states[:, start : start + steps] if all_free else states[:, start + free])
        hidden = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        choices = self.image_choice_index(image_ids if all_free else image_ids[:, free])
        settings = rollout.sampling
        kept = rollout.kept[:, rollout.num_plan_tokens:] if rollout.kept is not None and settings.truncates else None
        if kept is not None and not all_free:
            kept = kept[:, free]

        def head(hidden_chunk: Tensor, choice_chunk: Tensor, kept_chunk: Tensor | None) -> tuple[Tensor, Tensor]:
            logits = self.image_logits(hidden_chunk)
            processed = process_logits(logits[:n], logits[n:] if guided else None, settings, kept_chunk)
            entropy = processed.new_zeros(0)
            if return_entropy:
                entropy = entropy_of_logits(processed if entropy_grad else processed.detach())
            return selective_log_softmax(processed, choice_chunk), entropy

        chunk_size = self.score_chunk_size or len(free)
        parts, entropies = [], []
        for start in range(0, len(free), chunk_size):
            chunk = slice(start, start + chunk_size)
            kept_chunk = kept[:, chunk] if kept is not None else None
            if self.score_chunk_size and torch.is_grad_enabled():  # logits are recomputed per chunk in backward
                logp, entropy = checkpoint(head, hidden[:, chunk], choices[:, chunk], kept_chunk, use_reentrant=False)
            else:
                logp, entropy = head(hidden[:, chunk], choices[:, chunk], kept_chunk)
            parts.append(logp)
            entropies.append(entropy)
        logprobs = torch.cat(parts, 1)
        entropy = torch.cat(entropies, 1) if return_entropy else None
        if len(free) < steps:  # forced positions score exactly 0
            zeros = torch.zeros(n, steps, dtype=torch.float32, device=image_ids.device)
            logprobs = zeros.index_copy(1, free, logprobs)
            entropy = zeros.index_copy(1, free, entropy) if return_entropy else None
        return logprobs, entropy

    # -- shared machinery ---------------------------------------------------------------------------------------

    @property
    def num_completion_tokens(self) -> int:
        """T of the rollout: the plan span (when think-then-draw is on) plus the image tokens."""
        return (self.plan.max_tokens if self.plan is not None else 0) + self.num_image_tokens

    def set_plan(self, plan) -> None:
        """Turn think-then-draw on (a `policies.plan.PlanSettings`, which attaches its planner) or off (None)."""
        planner = plan.attach(self) if plan is not None else None  # raises for a family without text hooks
        self.plan, self.planner = plan, planner

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def modules(self) -> list[nn.Module]:
        """Every network of the policy, the language model first (a family adds its image decoder)."""
        return [self.model]

    def freeze(self) -> None:
        """No gradients and eval mode everywhere; training adds the LoRA adapter (`add_lora`)."""
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def to(self, device: torch.device | str) -> "Policy":
        for module in self.modules():
            module.to(device)
        return self

    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.0, train_image_heads: bool = True):
        """Wrap the model with a LoRA adapter in place; returns the PeftModel (kept as `self.peft_model`).

        peft swaps layers inside `self.model`, so the family code keeps calling its submodules unchanged.
        """
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=self.lora_target_modules,
            modules_to_save=list(self.modules_to_save) if train_image_heads else None,
        )
        self.peft_model = get_peft_model(self.model, config)
        return self.peft_model

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy for KL: the same model with the adapter disabled (no second copy)."""
        if self.peft_model is None:
            raise RuntimeError("reference() needs a LoRA adapter; call add_lora() first")
        with self.peft_model.disable_adapter():
            yield

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(adapter parameters, image-head parameters trained in full), so each can get its own learning rate."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return ([p for n, p in named if "modules_to_save" not in n], [p for n, p in named if "modules_to_save" in n])

    def decoder_layers(self) -> list[nn.Module]:
        """The language model's transformer blocks, which FSDP shards one by one (grpo_img/sharding.py).

        Default: the modules whose class the transformers model lists in `_no_split_modules` and whose name ends
        in "DecoderLayer", transformers' name for language-model blocks (vision and VQ blocks in that list are
        named otherwise, and stay replicated). A family whose blocks are named differently overrides this."""
        names = {n for n in getattr(self.model, "_no_split_modules", None) or () if n.endswith("DecoderLayer")}
        return [m for m in self.model.modules() if type(m).__name__ in names]

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def validate_for_training(self, train_image_tokens: bool = True) -> None:
        """Raise if GRPO would have nothing to train (e.g. a family whose image tokens are all forced)."""
        trains_plan = self.plan is not None and self.plan.train_plan
        trains_image = train_image_tokens and self.free_image_tokens and (self.plan is None or self.plan.train_image)
        if not (trains_plan or trains_image):
            why = ("its image tokens are all forced" if not self.free_image_tokens
                   else "both the plan and the image span are switched off")
            raise ValueError(f"policy {self.name!r} has no trainable choice: {why}. Turn think-then-draw on "
                             "(`plan: true`, `train_plan: true`) so that GRPO trains the plan")
