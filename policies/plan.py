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

A family adopts it by inheriting `ThinkThenDraw` and implementing four small hooks (`plan_tokenizer`,
`plan_prompt_text`, `text_logits`, `image_prefix_ids`; optionally `plan_banned_ids`), then, in its own sampler and
scorer, using `image_contexts` (plan or no plan: the contexts its image sampler runs after) /
`make_rollout` / `image_context` / `join_plan_logprobs`. Its image
sampler has to accept one context per row (with a plan, rows of a group no longer share a prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from trl.trainer.utils import selective_log_softmax

from policies.base import (CachedDecoder, Rollout, SamplingSettings, entropy_of_logits, position_ids_from_mask,
                           process_logits, sample_from_logits)

# The bare prompt: the family's template around it asks for the plan. Configs set a T2I-R1-style request instead.
DEFAULT_INSTRUCTION = "{prompt}"


@dataclass(frozen=True)
class PlanSettings:
    """How the plan is written and which spans GRPO trains."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    end_marker: str | None = None  # a token of the family's tokenizer; None: its EOS token
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


@dataclass
class ImageContexts:
    """What a family's image sampler runs after (`ids`, `mask`, `repeats` samples per row) and the per-sample prompt
    rows the rollout keeps."""

    prompt_ids: Tensor  # [N, P] one row per sample
    prompt_mask: Tensor
    ids: Tensor  # [N / repeats, C] the contexts
    mask: Tensor
    repeats: int
    plan: "PlanBatch | None"


@dataclass
class PlanBatch:
    """Sampled plans, one row per sample."""

    ids: Tensor  # [N, M] the span, pad after the stop token
    written: Tensor  # [N, M] bool, tokens actually written (incl. the stop token)
    logprobs: Tensor  # [N, M] float32, 0 where not written
    texts: list[str]


class ThinkThenDraw:
    """Mixin for a `Policy` that can write a plan before its image. See the module docstring."""

    # -- hooks a family implements ------------------------------------------------------------------------------

    @property
    def plan_tokenizer(self):
        """The text tokenizer (left padding, adds BOS)."""
        raise NotImplementedError

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

    def plan_banned_ids(self) -> list[int]:
        """Token ids a plan may not write (image-only tokens, ...)."""
        return []

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The family's image-generation prompts, left-padded (used when there is no plan)."""
        raise NotImplementedError

    # -- generic machinery --------------------------------------------------------------------------------------

    def end_marker_id(self) -> int:
        tokenizer = self.plan_tokenizer
        marker = self.plan.end_marker or tokenizer.eos_token
        if marker is None:
            raise ValueError(f"{self.name}: the tokenizer has no EOS token; set the plan's end_marker")
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if token_id is None or (token_id == tokenizer.unk_token_id and marker != tokenizer.unk_token):
            raise ValueError(f"{self.name}: plan end marker {marker!r} is not a token of the tokenizer")
        return token_id

    def plan_stop_ids(self) -> Tensor:
        return torch.tensor([self.end_marker_id(), self.image_prefix_ids[0]], device=self.device)

    def encode_plan_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        texts = [self.plan_prompt_text(self.plan.instruction.format(prompt=p)) for p in prompts]
        batch = self.plan_tokenizer(texts, padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _banned_tensor(self) -> Tensor | None:
        """`plan_banned_ids` as a tensor, built once per sampling or scoring call (it can hold ~65k ids)."""
        banned = self.plan_banned_ids()
        return torch.tensor(banned, device=self.device) if banned else None

    def _plan_distribution(self, logits: Tensor, banned: Tensor | None) -> Tensor:
        if banned is not None:
            logits = logits.float().index_fill(-1, banned, float("-inf"))
        return process_logits(logits, None, self.plan.sampling)

    def plan_written(self, span: Tensor) -> Tensor:
        """[N, M] bool: the tokens up to and including the first stop token (all of them if there is none)."""
        is_stop = torch.isin(span, self.plan_stop_ids()).long()
        return (is_stop.cumsum(-1) - is_stop) == 0

    @torch.no_grad()
    def sample_plans(self, prompts: list[str], group_size: int, generator: torch.Generator | None
                     ) -> tuple[Tensor, Tensor, PlanBatch]:
        """Plan-writing prompt ids and mask [N, P] (N = prompts x group_size) and the sampled plans."""
        from transformers import DynamicCache

        ids, mask = self.encode_plan_prompts(prompts)
        n, width = len(prompts) * group_size, self.plan.max_tokens
        stop_ids, pad = self.plan_stop_ids(), self.plan_tokenizer.pad_token_id

        # the group shares its prompt's prefill
        decoder = CachedDecoder(lambda *args: self.text_logits(*args)[:, -1], ids, mask, group_size, DynamicCache())
        ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
        logits, banned = decoder.last, self._banned_tensor()

        span = torch.full((n, width), pad, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(n, width, dtype=torch.float32, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for t in range(width):
            token, logprob = sample_from_logits(self._plan_distribution(logits, banned), generator)
            span[:, t] = torch.where(done, pad, token)
            logprobs[:, t] = torch.where(done, 0.0, logprob)
            written = ~done
            done = done | torch.isin(token, stop_ids)
            if bool(done.all()) or t + 1 == width:
                break
            # finished rows keep stepping with a masked pad, so that every row's cache has the same length
            logits = decoder.step(span[:, t : t + 1], written)

        written = self.plan_written(span)
        texts = self.plan_tokenizer.batch_decode(span.masked_fill(~written | torch.isin(span, stop_ids), pad),
                                                 skip_special_tokens=True)
        return ids, mask, PlanBatch(span, written, logprobs, [t.strip() for t in texts])

    def image_contexts(self, prompts: list[str], group_size: int, generator: torch.Generator | None
                       ) -> ImageContexts:
        """Without a plan, one context per prompt: prefilled once, its KV cache shared by the group's samples.
        With a plan, one context per sample: the plans are sampled first, then prompt + own plan + image prefix."""
        if self.plan is None:
            ids, mask = self.encode_prompts(prompts)
            return ImageContexts(ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0),
                                 ids, mask, group_size, None)
        ids, mask, plan = self.sample_plans(prompts, group_size, generator)
        context_ids, context_mask = self.plan_context(ids, mask, plan.ids)
        return ImageContexts(ids, mask, context_ids, context_mask, 1, plan)

    def plan_context(self, prompt_ids: Tensor, prompt_mask: Tensor, span: Tensor) -> tuple[Tensor, Tensor]:
        """The image's context per row: prompt + plan (end marker and padding masked out) + image prefix."""
        written = self.plan_written(span)
        span_mask = written & (span != self.end_marker_id())
        prefix = torch.tensor(self.image_prefix_ids, device=span.device).expand(len(span), -1)
        prefix_mask = torch.ones_like(prefix, dtype=torch.bool)
        prefix_mask[:, 0] = ~((span == prefix[:, :1]) & written).any(-1)  # the plan already wrote begin-of-image
        ids = torch.cat([prompt_ids, span, prefix], dim=1)
        mask = torch.cat([prompt_mask, span_mask.to(prompt_mask.dtype), prefix_mask.to(prompt_mask.dtype)], dim=1)
        return ids, mask

    def plan_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Teacher-forced log-probs and entropies [N, M] of the plan span (0 where not written), with grad."""
        span = rollout.plan_ids
        written = self.plan_written(span)
        ids = torch.cat([rollout.prompt_ids, span], dim=1)
        mask = torch.cat([rollout.prompt_mask, written.to(rollout.prompt_mask.dtype)], dim=1)
        start = rollout.prompt_ids.shape[1] - 1  # the hidden state before token t predicts token t
        logits = self.text_logits(ids[:, :-1], mask[:, :-1], position_ids_from_mask(mask[:, :-1]))[:, start:]
        processed = self._plan_distribution(logits, self._banned_tensor())
        logprobs = selective_log_softmax(processed, span).masked_fill(~written, 0.0)
        return logprobs, entropy_of_logits(processed.detach()).masked_fill(~written, 0.0)

    def make_rollout(self, prompts: list[str], group_size: int, prompt_ids: Tensor, prompt_mask: Tensor,
                     image_ids: Tensor, image_free: Tensor, image_logprobs: Tensor, sampling: SamplingSettings,
                     plan: PlanBatch | None, extras: dict | None = None) -> Rollout:
        """A rollout with or without a plan. `prompt_ids` has one row per sample; `image_free` marks free image
        tokens (the action mask of the image span before train_image is applied)."""
        completion, action, logprobs, width, texts = image_ids, image_free, image_logprobs, 0, None
        if plan is not None:
            completion = torch.cat([plan.ids, image_ids], dim=1)
            action = torch.cat([plan.written & self.plan.train_plan, image_free & self.plan.train_image], dim=1)
            logprobs = torch.cat([plan.logprobs, image_logprobs], dim=1)
            width, texts = plan.ids.shape[1], plan.texts
        return Rollout(
            prompts=[p for p in prompts for _ in range(group_size)],
            group_index=torch.arange(len(prompts), device=self.device).repeat_interleave(group_size),
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion, action_mask=action,
            logprobs=logprobs, sampling=sampling, extras=extras or {}, num_plan_tokens=width, plans=texts,
        )

    def image_context(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """The context the image tokens were sampled after: the prompt, or prompt + plan + image prefix."""
        if rollout.num_plan_tokens == 0:
            return rollout.prompt_ids, rollout.prompt_mask
        return self.plan_context(rollout.prompt_ids, rollout.prompt_mask, rollout.plan_ids)

    def join_plan_logprobs(self, rollout: Rollout, image_logprobs: Tensor, image_entropy: Tensor | None,
                           return_entropy: bool):
        """Prepend the plan span's scores to the family's image scores (no-op without a plan)."""
        if rollout.num_plan_tokens:
            plan_logprobs, plan_entropy = self.plan_logprobs(rollout)
            image_logprobs = torch.cat([plan_logprobs, image_logprobs], dim=1)
            if image_entropy is not None:
                image_entropy = torch.cat([plan_entropy, image_entropy], dim=1)
        return (image_logprobs, image_entropy) if return_entropy else image_logprobs
