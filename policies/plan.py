"""Think-then-draw: the policy first writes a short text plan, then the image conditioned on prompt + plan.

The plan is the semantic-level chain of thought of T2I-R1 (a rewrite of the prompt, a layout): text sampled from
the family's own language model and text head, KV-cached, *without* CFG, with its own settings (`PlanSettings`).
It stops at its end marker, at the family's begin-of-image token, or after `max_tokens`.

Layout of a rollout with a plan (generic, the same for every family):

    prompt_ids    = the plan-writing prompt, left-padded ("<|User|>: {instruction}<|Assistant|>:" for Janus)
    completion    = [plan span, `max_tokens` columns, padded after the stop token | the family's image tokens]
    image context = prompt_ids + plan span (end marker and padding masked out) + `image_prefix_ids` (e.g. BOI)

Positions come from the attention mask everywhere, so the masked holes in the context do not shift anything and
sampling (KV cache with holes) and teacher-forced scoring (one forward with the same mask) see the same sequence.
Which tokens were written is derived from the span itself (everything up to and including the first stop token),
so a rollout needs no extra bookkeeping. If the plan stops at begin-of-image, that token is already in the
context and the prefix's first column is masked out instead of repeating it.

Both spans are actions: the plan's written tokens (incl. its stop token) when `train_plan`, the family's free image
tokens when `train_image`. The plan's log-probs are conditional (no CFG: it is text); the image's unconditional CFG
row is whatever the family's null condition does to the context (Janus: every token but BOS/BOI becomes pad, so
the plan is blanked together with the prompt, which is the null condition the model was trained with).

The planner is attached from outside: `policy.set_plan(PlanSettings(...))` builds a `Planner` over the policy's
text hooks (`plan_tokenizer`, `plan_prompt_text`, `text_logits`, `image_prefix_ids`; optionally `plan_banned_ids`,
`encode_plan_requests`, `default_plan_end_marker`), and the engine in `policies/base.py` asks it for the image
contexts and the plan span's scores. This module imports `policies/base.py`, never the other way round; a family
that cannot write a plan (`plan_refusal`, e.g. Chameleon's interleaved mode) is refused at attach time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache
from trl.trainer.utils import selective_log_softmax

from policies.base import (CachedDecoder, ImageContexts, PlanBatch, Policy, Rollout, SamplingSettings,
                           entropy_of_logits, kept_counts, position_ids_from_mask, process_logits,
                           sample_from_logits)

# The bare prompt: the family's template around it asks for the plan. Configs set a T2I-R1-style request instead.
DEFAULT_INSTRUCTION = "{prompt}"


@dataclass(frozen=True)
class PlanSettings:
    """How the plan is written and which spans GRPO trains."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    end_marker: str | None = None  # a token of the family's tokenizer; None: the family's default (its EOS)
    instruction: str = DEFAULT_INSTRUCTION  # the plan-writing request; must contain "{prompt}"
    train_plan: bool = True
    train_image: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"plan max_tokens must be >= 1, got {self.max_tokens}")
        if "{prompt}" not in self.instruction:
            raise ValueError(f"plan instruction must contain '{{prompt}}', got {self.instruction!r}")
        self.sampling  # validates temperature / top_k / top_p

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(1.0, self.temperature, self.top_k, self.top_p)

    def attach(self, policy: Policy) -> "Planner":
        """The planner of `policy` with these settings (what `policy.set_plan(settings)` calls)."""
        return Planner(policy, self)


class Planner:
    """Writes and scores plans for one policy through its text hooks. See the module docstring."""

    def __init__(self, policy: Policy, settings: PlanSettings) -> None:
        if policy.plan_refusal is not None:
            raise ValueError(f"{policy.name}: no think-then-draw: {policy.plan_refusal}")
        self.policy, self.settings = policy, settings
        self.end_id = self._end_marker_id()  # fails now, not mid-run, on an unknown end marker
        self.stop_ids = torch.tensor([self.end_id, policy.image_prefix_ids[0]])
        banned = policy.plan_banned_ids(self.end_id)
        self.banned = torch.tensor(banned) if banned else None  # can hold ~65k ids: built once

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def _end_marker_id(self) -> int:
        tokenizer = self.policy.plan_tokenizer
        marker = self.settings.end_marker or self.policy.default_plan_end_marker or tokenizer.eos_token
        if marker is None:
            raise ValueError(f"{self.policy.name}: the tokenizer has no EOS token; set the plan's end_marker")
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if token_id is None or (token_id == tokenizer.unk_token_id and marker != tokenizer.unk_token):
            raise ValueError(f"{self.policy.name}: plan end marker {marker!r} is not a token of the tokenizer")
        return token_id

    def end_marker_id(self) -> int:
        return self.end_id

    def plan_stop_ids(self) -> Tensor:
        return self.stop_ids.to(self.device)

    def _distribution(self, logits: Tensor, kept: Tensor | None = None) -> Tensor:
        if self.banned is not None:
            logits = logits.float().index_fill(-1, self.banned.to(logits.device), float("-inf"))
        return process_logits(logits, None, self.settings.sampling, kept)

    def plan_written(self, span: Tensor) -> Tensor:
        """[N, M] bool: the tokens up to and including the first stop token (all of them if there is none)."""
        is_stop = torch.isin(span, self.stop_ids.to(span.device)).long()
        return (is_stop.cumsum(-1) - is_stop) == 0

    def encode_plan_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        return self.policy.encode_plan_requests([self.settings.instruction.format(prompt=p) for p in prompts])

    @torch.no_grad()
    def sample_plans(self, prompts: list[str], group_size: int, generator: torch.Generator | None
                     ) -> tuple[Tensor, Tensor, PlanBatch]:
        """Plan-writing prompt ids and mask [N, P] (N = prompts x group_size) and the sampled plans."""
        policy = self.policy
        ids, mask = self.encode_plan_prompts(prompts)
        n, width = len(prompts) * group_size, self.settings.max_tokens
        stop_ids, pad = self.plan_stop_ids(), policy.plan_tokenizer.pad_token_id

        # the group shares its prompt's prefill
        decoder = CachedDecoder(lambda *args: policy.text_logits(*args)[:, -1], ids, mask, group_size,
                                DynamicCache(), max_new_tokens=width)
        ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
        logits = decoder.last

        span = torch.full((n, width), pad, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(n, width, dtype=torch.float32, device=self.device)
        kept = torch.zeros(n, width, dtype=torch.int32, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for t in range(width):
            processed = self._distribution(logits)
            token, logprob = sample_from_logits(processed, generator)
            span[:, t] = torch.where(done, pad, token)
            logprobs[:, t] = torch.where(done, 0.0, logprob)
            if self.settings.sampling.truncates:
                kept[:, t] = torch.where(done, 0, kept_counts(processed))
            written = ~done
            done = done | torch.isin(token, stop_ids)
            if t + 1 == width or all_done(done, policy.lockstep):
                break
            # finished rows keep stepping with a masked pad, so that every row's cache has the same length
            logits = decoder.step(span[:, t : t + 1], written)

        written = self.plan_written(span)
        texts = policy.plan_tokenizer.batch_decode(span.masked_fill(~written | torch.isin(span, stop_ids), pad),
                                                   skip_special_tokens=True)
        return ids, mask, PlanBatch(span, written, logprobs, [t.strip() for t in texts], kept)

    def image_contexts(self, prompts: list[str], group_size: int, generator: torch.Generator | None
                       ) -> ImageContexts:
        """One context per sample: the plans are sampled first, then prompt + own plan + image prefix."""
        ids, mask, plan = self.sample_plans(prompts, group_size, generator)
        context_ids, context_mask = self.plan_context(ids, mask, plan.ids)
        return ImageContexts(ids, mask, context_ids, context_mask, 1, plan)

    def plan_context(self, prompt_ids: Tensor, prompt_mask: Tensor, span: Tensor) -> tuple[Tensor, Tensor]:
        """The image's context per row: prompt + plan (end marker and padding masked out) + image prefix."""
        written = self.plan_written(span)
        span_mask = written & (span != self.end_id)
        prefix = torch.tensor(self.policy.image_prefix_ids, device=span.device).expand(len(span), -1)
        prefix_mask = torch.ones_like(prefix, dtype=torch.bool)
        prefix_mask[:, 0] = ~((span == prefix[:, :1]) & written).any(-1)  # the plan already wrote begin-of-image
        ids = torch.cat([prompt_ids, span, prefix], dim=1)
        mask = torch.cat([prompt_mask, span_mask.to(prompt_mask.dtype), prefix_mask.to(prompt_mask.dtype)], dim=1)
        return ids, mask

    def plan_logprobs(self, rollout: Rollout, entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
        """Teacher-forced log-probs and entropies [N, M] of the plan span (0 where not written), with grad (the
        entropies only with `entropy_grad`)."""
        span = rollout.plan_ids
        written = self.plan_written(span)
        ids = torch.cat([rollout.prompt_ids, span], dim=1)
        mask = torch.cat([rollout.prompt_mask, written.to(rollout.prompt_mask.dtype)], dim=1)
        start = rollout.prompt_ids.shape[1] - 1  # the hidden state before token t predicts token t
        logits = self.policy.text_logits(ids[:, :-1], mask[:, :-1], position_ids_from_mask(mask[:, :-1]))[:, start:]
        kept = rollout.kept[:, : rollout.num_plan_tokens] if rollout.kept is not None else None
        processed = self._distribution(logits, kept)
        logprobs = selective_log_softmax(processed, span).masked_fill(~written, 0.0)
        entropy = entropy_of_logits(processed if entropy_grad else processed.detach())
        return logprobs, entropy.masked_fill(~written, 0.0)


def all_done(done: Tensor, lockstep: bool) -> bool:
    """Every row has stopped; with `lockstep`, on every process (one all-reduce), so that no process runs a forward
    the others do not."""
    if not lockstep or not torch.distributed.is_initialized():
        return bool(done.all())
    flag = done.all().to(torch.int32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
