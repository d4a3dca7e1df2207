"""The policy contract: what every model family gives the trainer.

A policy samples image tokens (with classifier-free guidance), turns them into pixels and scores its own samples
by teacher forcing. The trainer sees only this interface; everything family-specific (prompt format, which head
gives the image logits, how tokens become pixels) lives in one file per family.

The guided, filtered next-token distribution is built by one function, `process_logits`, used by the sampler and
by the scorer of every family, so that "the distribution sampled from" and "the distribution scored" cannot drift
apart.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator, Literal

import torch
from PIL import Image
from torch import Tensor, nn

CfgMode = Literal["mixture", "conditional"]


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that shapes the token distribution. Applied identically in sampling and scoring.

    `top_k=0` and `top_p=1.0` mean "off". They are off by default on purpose: transformers' own default top-k of 50
    silently truncates the distribution, and a truncated distribution gives -inf log-probs to tokens the updated
    policy would still like to move towards.
    """

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


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


# ----------------------------------------------------------------------------------------------------------------
# The one definition of the sampled distribution


def process_logits(cond: Tensor, uncond: Tensor | None, settings: SamplingSettings) -> Tensor:
    """Guided, tempered, truncated logits, in float32. Masked-out tokens are -inf.

    CFG is applied to raw logits, `u + s (c - u)`, as Janus-Pro and Chameleon do it; a family whose release mixes
    log-softmaxes instead (Emu3) normalises its inputs before calling this.
    """
    logits = cond.float()
    if uncond is not None and settings.uses_cfg:
        uncond = uncond.float()
        logits = uncond + settings.cfg_scale * (logits - uncond)
    logits = logits / settings.temperature
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
    return logits


def sample_from_logits(logits: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from processed logits [B, V]; returns (tokens [B], log-probs [B])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if not torch.isfinite(logprobs.logsumexp(-1)).all():
        raise FloatingPointError("non-finite logits while sampling: the model's weights or activations hold NaN/inf "
                                 "(diverged training, or an fp16 overflow)")
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def entropy_of_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) over the last dim. Unlike trl's entropy_from_logits it tolerates -inf logits (top-k/top-p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions that ignore left padding, so a prompt's samples do not depend on the batch it was padded in."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class CachedDecoder:
    """Rows that decode one token at a time on a KV cache. Each context row is prefilled once and its cache shared
    by the `repeats` samples drawn from it (rows [i * repeats, (i + 1) * repeats) continue context row i).

    `forward(inputs, mask, positions, cache)` runs the family's model and returns what the next token is drawn from
    at the last position ([rows, ...]: hidden states or logits). Positions come from the mask, so left padding and
    masked columns shift nothing.
    """

    def __init__(self, forward: Callable[..., Tensor], inputs: Tensor, mask: Tensor, repeats: int, cache) -> None:
        self.forward, self.cache = forward, cache
        last = forward(inputs, mask, position_ids_from_mask(mask), cache)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        self.last = last.repeat_interleave(repeats, 0)
        self.mask = mask.repeat_interleave(repeats, 0)

    def step(self, inputs: Tensor, attended: Tensor | None = None) -> Tensor:
        """Feed one token per row (`attended` [rows]: 0 where the fed token must stay unseen, e.g. padding after a
        row has finished) and return the new output at the last position."""
        column = self.mask.new_ones(len(self.mask), 1) if attended is None else attended.to(self.mask.dtype)[:, None]
        self.mask = torch.cat([self.mask, column], dim=1)
        self.last = self.forward(inputs, self.mask, position_ids_from_mask(self.mask)[:, -1:], self.cache)
        return self.last


def check_cfg_mode(cfg_mode: str) -> None:
    if cfg_mode not in ("mixture", "conditional"):
        raise ValueError(f"cfg_mode must be 'mixture' or 'conditional', got {cfg_mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# The contract


class Policy(ABC):
    """A token-level image policy. Subclasses set `model` (the HF model, trained through LoRA) and implement the
    four abstract methods; the trainer uses nothing else."""

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
    #: Think-then-draw settings (policies/plan.py), set with `set_plan`; None: the image follows the prompt.
    plan = None
    #: Side of the decoded square image in pixels.
    image_size: int = 0

    model: nn.Module
    peft_model: nn.Module | None = None

    @abstractmethod
    def sample(
        self,
        prompts: list[str],
        group_size: int,
        *,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample `group_size` images per prompt (no grad)."""

    @abstractmethod
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        """Tokens to pixels, the whole way, no grad, micro-batched."""

    @abstractmethod
    def token_logprobs(
        self, rollout: Rollout, cfg_mode: CfgMode = "mixture", return_entropy: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced log-probs [N, T] of the rollout's tokens, with grad. With `return_entropy`, also the
        entropy [N, T] of the scored distribution (detached)."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Save weights and tokenizer/processor so that `build(name, model_name_or_path=path)` loads them back."""

    # -- shared machinery ---------------------------------------------------------------------------------------

    @property
    def num_completion_tokens(self) -> int:
        """T of the rollout: the plan span (when think-then-draw is on) plus the image tokens."""
        return (self.plan.max_tokens if self.plan is not None else 0) + self.num_image_tokens

    @num_completion_tokens.setter
    def num_completion_tokens(self, value: int) -> None:  # families written before plans set this directly
        self.num_image_tokens = value

    def set_plan(self, plan) -> None:
        """Turn think-then-draw on (a `policies.plan.PlanSettings`) or off (None)."""
        from policies.plan import ThinkThenDraw

        if plan is not None and not isinstance(self, ThinkThenDraw):
            raise NotImplementedError(f"policy {self.name!r} does not support think-then-draw yet (it needs the "
                                      "ThinkThenDraw hooks of policies/plan.py)")
        self.plan = plan
        if plan is not None:
            self.end_marker_id()  # fails now, not mid-run, on an unknown end marker

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> "Policy":
        self.model.to(device)
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
