"""GRPO's arithmetic as pure functions: group advantages, the policy losses of TRL 1.16 by its names, aggregation.

Symbols follow the DeepSeekMath / DAPO papers: r = pi_theta / pi_old per token, A the sample's advantage,
loss_t = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * KL_t with KL_t = exp(q - p) - (q - p) - 1 where
p = log pi_theta and q = log pi_ref (the k3 estimator, unbiased and always >= 0).

The variants (`LossSettings`; config fields of the same names, meanings as in TRL's `GRPOConfig`):
- `importance_sampling_level="sequence"` (GSPO): one ratio per sample, exp(mean over its tokens of log r).
- `delta` (INTELLECT-2): r is also capped at delta in the unclipped branch (two-sided clipping).
- `use_bias_correction_kl` (DeepSeek-V3.2): KL_t weighted by r. Off by default here (TRL: on): the plain k3 term
  is what the rest of grpo-img's numbers and tests assume.
- `loss_type`:  grpo / bnpo / dapo / dr_grpo (the clipped surrogate, aggregated four ways, see `aggregate`),
  cispo (MiniMax-M1: -sg(min(r, eps_high)) A log p), sapo (soft gate -sigmoid(tau (r - 1)) 4 / tau A, tau per
  advantage sign), luspo (the clipped surrogate summed over each sample's tokens: GSPO scaled by length), vespo
  (-sg(phi(w)) A log p with phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w, k/lambda per sign).
- `off_policy_mask_threshold` (DeepSeek-V3.2): a negative-advantage sample whose mean log(pi_old / pi_theta) exceeds
  the threshold leaves the loss.
- `top_entropy_quantile` (Beyond the 80/20 rule): only tokens at or above that entropy quantile train
  (`high_entropy_mask`); `entropy_coef`: minus coef x the mean entropy of the trained tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from trl.trainer.utils import nanstd

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@dataclass(frozen=True)
class LossSettings:
    """The policy-loss options; defaults are TRL 1.16's, except `use_bias_correction_kl` (see the module)."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    beta: float = 0.0
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got "
                             f"{self.importance_sampling_level!r}")
        checks = {"epsilon": (self.epsilon, 0.0), "epsilon_high": (self.epsilon_high, 0.0),
                  "delta": (self.delta, 1.0), "off_policy_mask_threshold": (self.off_policy_mask_threshold, 0.0),
                  "sapo_temperature_pos": (self.sapo_temperature_pos, 0.0),
                  "sapo_temperature_neg": (self.sapo_temperature_neg, 0.0),
                  "vespo_lambda_pos": (self.vespo_lambda_pos, 0.0), "vespo_lambda_neg": (self.vespo_lambda_neg, 0.0)}
        for name, (value, above) in checks.items():
            if value is not None and not (math.isfinite(value) and value > above):
                raise ValueError(f"{name} must be a number > {above:g}, got {value}")
        for name in ("beta", "vespo_k_pos", "vespo_k_neg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be finite, got {self.entropy_coef}")

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


Reduce = Callable[[Tensor], Tensor]  # sums a tensor over every process (identity on one process)


def batch_moments(values: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Mean and (Bessel-corrected) std of the non-NaN `values` of the whole batch, over every process: the sum, the
    sum of squares and the count are summed by `reduce`, so each process gets the global figures."""
    scored = ~torch.isnan(values)
    x = values[scored].double()
    totals = torch.stack([x.sum(), (x * x).sum(), scored.sum().double()])
    totals = reduce(totals) if reduce is not None else totals
    total, squares, count = totals.unbind()
    mean = total / count.clamp(min=1.0)
    variance = (squares - count * mean * mean).clamp(min=0.0) / (count - 1).clamp(min=1.0)
    return mean.float(), variance.sqrt().float()


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     reduce: Reduce | None = None) -> Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4). `rewards` [N] with groups contiguous.

    NaN rewards (samples a reward could not score) are left out of their group's mean and std and get advantage
    0; the trainer also drops them from the loss mask. `scale_rewards`: "group" divides by the group's std,
    "batch" by the std of the whole batch over every process (`reduce`, as TRL does), "none" not at all (Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1, keepdim=True).nan_to_num(0.0)
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (batch_moments(grouped, reduce)[1] + 1e-4)
    return advantages.nan_to_num(0.0).view(-1)


def normalize_then_sum_advantages(parts: Tensor, weights: Tensor, group_size: int,
                                  reduce: Reduce | None = None) -> Tensor:
    """GDPO (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward part [N, K] normalised within
    its group, (r - mean) / (std + 1e-4), then the weighted sum, then normalised over the whole batch of every
    process. A sample with any part NaN is unscored (advantage 0, as the weighted sum would be NaN)."""
    n, k = parts.shape
    if n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    unscored = torch.isnan(parts).any(1)
    grouped = parts.float().masked_fill(unscored[:, None], float("nan")).view(-1, group_size, k)
    normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True)
                                                                            .nan_to_num(0.0) + 1e-4)
    summed = (normalised.view(n, k) * weights.to(parts.device).float()).sum(1)
    mean, std = batch_moments(summed, reduce)
    return ((summed - mean) / (std + 1e-4)).nan_to_num(0.0)


def zero_variance_groups(rewards: Tensor, group_size: int, tolerance: float = 1e-6) -> Tensor:
    """[groups] bool: groups whose scored samples carry no learning signal, i.e. fewer than two of them were scored
    or their rewards are equal within `tolerance` (std of the scored samples only; unscored samples are NaN)."""
    grouped = rewards.view(-1, group_size).float()
    scored = (~torch.isnan(grouped)).sum(1)
    std = nanstd(grouped, dim=1).nan_to_num(0.0)
    return (scored < 2) | (std <= tolerance)


@dataclass
class LossNormalizer:
    """Counts over one optimizer window (all micro-batches of one update, all processes), per process.

    Each process divides by these and gradients are then averaged over processes, which reproduces the loss of
    one process holding the whole window.
    """

    sequences: float  # sequences in the window / num_processes
    tokens: float  # action tokens in the window / num_processes
    micro_batches: int  # micro-batches per process in the window
    completion_length: int  # T, for dr_grpo's constant normaliser


def aggregate(per_token_loss: Tensor, mask: Tensor, loss_type: str, norm: LossNormalizer) -> Tensor:
    """This micro-batch's share of the window's loss. Summed over the window's micro-batches it gives:

    grpo, sapo:          mean over sequences of (mean over each sequence's tokens)       (DeepSeekMath)
    bnpo:                mean over each micro-batch's tokens, averaged over micro-batches (TRL's bnpo)
    dapo, cispo, vespo:  mean over all tokens of the window                             (DAPO token-level)
    dr_grpo:             sum over tokens / (sequences x T)                               (Dr. GRPO, no length bias)
    luspo:               mean over sequences of (sum over each sequence's tokens)        (LUSPO)
    """
    mask = mask.float()
    if loss_type in ("grpo", "sapo"):
        per_sequence = (per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_sequence.sum() / norm.sequences
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / norm.micro_batches
    if loss_type in ("dapo", "cispo", "vespo"):
        return (per_token_loss * mask).sum() / max(norm.tokens, 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (norm.sequences * norm.completion_length)
    if loss_type == "luspo":
        return (per_token_loss * mask).sum() / norm.sequences
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def high_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float,
                      gather: Callable[[Tensor], Tensor] = lambda x: x) -> Tensor:
    """[B, T] bool: action tokens whose entropy is at or above the (1 - quantile) quantile of the action tokens'
    entropies, over every process (`gather` concatenates one 1-D tensor from each)."""
    values = gather(entropy[mask.bool()].float().detach())
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy >= threshold) & mask.bool()


def off_policy_mask(advantages: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """[B, 1]: 0 for a sample with a negative advantage whose mean log(pi_old / pi_theta) over its tokens exceeds
    `threshold` (it has drifted too far to push down safely), else 1."""
    maskf = mask.float()
    drift = ((old_logprobs - logprobs.detach()) * maskf).sum(1, keepdim=True) / maskf.sum(1, keepdim=True).clamp(min=1)
    return ((advantages >= 0) | (drift <= threshold)).to(logprobs.dtype)


@torch.no_grad()
def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, settings: LossSettings) -> Tensor:
    """VESPO's phi(w) [B, 1] = exp(lambda + k log w - lambda w), w the sequence ratio (the sum of the token log
    ratios, clamped to [log 1e-8, 20]), k and lambda by the sign of the advantage; detached, phi(1) = 1."""
    lower = math.log(1e-8)
    log_w = torch.clamp((log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True), lower, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, settings.vespo_k_pos, settings.vespo_k_neg)
    lam = torch.where(positive, settings.vespo_lambda_pos, settings.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    settings: LossSettings,
    norm: LossNormalizer,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    token_mask: Tensor | None = None,
    entropy_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of one micro-batch. Tensors [B, T]; advantages [B]. `entropy` (with grad) is needed for
    `entropy_coef`; `token_mask` (e.g. `high_entropy_mask`) restricts the trained tokens; `entropy_tokens`: the
    trained tokens of this micro-batch over all processes / num_processes (None: this micro-batch's), the entropy
    bonus's normaliser. Returns (loss, stats) where stats are detached sums over the micro-batch's action tokens
    (the caller averages them)."""
    s = settings
    eps_low, eps_high = s.epsilon, s.epsilon_upper
    advantages = advantages[:, None]
    maskf = mask.float()
    log_ratio = logprobs - old_logprobs
    if s.importance_sampling_level == "sequence":  # GSPO: one length-normalised ratio per sample, [B, 1]
        log_ratio_is = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_ratio_is = log_ratio
    ratio = torch.exp(log_ratio_is)

    kl = torch.zeros_like(logprobs)
    if s.beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        if s.use_bias_correction_kl:
            kl = kl * ratio

    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if s.loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=eps_high).detach() * advantages * logprobs
        clipped = (ratio > eps_high) & (advantages > 0)
    elif s.loss_type == "sapo":
        tau = torch.where(advantages > 0, s.sapo_temperature_pos, s.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    elif s.loss_type == "vespo":
        per_token_loss = -gamma_weights(advantages, log_ratio, maskf, s) * advantages * logprobs
    else:  # grpo, bnpo, dapo, dr_grpo, luspo: the clipped surrogate
        clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        capped = torch.clamp(ratio, max=s.delta) if s.delta is not None else ratio
        per_token_loss = -torch.min(capped * advantages, clipped_ratio * advantages)
        clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))

    if s.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask(advantages, logprobs, old_logprobs, mask,
                                                          s.off_policy_mask_threshold)
    if token_mask is not None:
        per_token_loss = per_token_loss * token_mask.to(per_token_loss.dtype)
    if s.beta != 0.0:
        per_token_loss = per_token_loss + s.beta * kl
    loss = aggregate(per_token_loss, mask, s.loss_type, norm)

    trained = maskf if token_mask is None else maskf * token_mask.float()
    if s.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the entropy (with grad)")
        # the mean entropy of the trained tokens, per micro-batch (of all processes together), averaged over the
        # window's micro-batches: on one process TRL's bonus, and the same however the batch is split
        count = trained.sum().item() if entropy_tokens is None else entropy_tokens
        loss = loss - s.entropy_coef * (entropy * trained).sum() / max(count, 1.0) / norm.micro_batches

    stats = {
        "kl_sum": (kl.detach() * maskf).sum(),
        "clipped_sum": (clipped.float() * maskf).sum(),
        "tokens": maskf.sum(),
        "trained_tokens": trained.sum(),
    }
    return loss, stats
