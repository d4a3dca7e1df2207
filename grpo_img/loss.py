"""GRPO's arithmetic as pure functions: group advantages, the clipped surrogate with a k3 KL, loss aggregation.

Symbols follow the DeepSeekMath / DAPO papers: r = pi_theta / pi_old per token, A the sample's advantage,
loss_t = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * KL_t with KL_t = exp(q - p) - (q - p) - 1 where
p = log pi_theta and q = log pi_ref (the k3 estimator, unbiased and always >= 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from trl.trainer.utils import nanstd

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4). `rewards` [N] with groups contiguous.

    NaN rewards (samples a reward could not score) are left out of their group's mean and std and get advantage
    0; the trainer also drops them from the loss mask. `scale_rewards`: "group" divides by the group's std,
    "batch" by the whole batch's std, "none" not at all (Dr. GRPO).
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
        advantages = advantages / (nanstd(grouped).nan_to_num(0.0) + 1e-4)
    return advantages.nan_to_num(0.0).view(-1)


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

    grpo:    mean over sequences of (mean over each sequence's tokens)        (DeepSeekMath)
    bnpo:    mean over each micro-batch's tokens, averaged over micro-batches (TRL's bnpo)
    dapo:    mean over all tokens of the window                              (DAPO token-level)
    dr_grpo: sum over tokens / (sequences x T)                                (Dr. GRPO, no length bias)
    """
    mask = mask.float()
    if loss_type == "grpo":
        per_sequence = (per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_sequence.sum() / norm.sequences
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / norm.micro_batches
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / max(norm.tokens, 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (norm.sequences * norm.completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    norm: LossNormalizer,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate GRPO loss of one micro-batch. Tensors [B, T]; advantages [B]. Returns (loss, stats)
    where stats are detached sums over the micro-batch's action tokens (the caller averages them)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = torch.zeros_like(logprobs)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token_loss = per_token_loss + beta * kl
    loss = aggregate(per_token_loss, mask, loss_type, norm)

    maskf = mask.float()
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    stats = {
        "kl_sum": (kl.detach() * maskf).sum(),
        "clipped_sum": (clipped.float() * maskf).sum(),
        "tokens": maskf.sum(),
    }
    return loss, stats
