"""The distributed plumbing of the trainer, kept out of the recipe: gradient averaging over processes, the launch's
sharding (FSDP2 or data-parallel; DeepSpeed refused), the start-up broadcast, and the gathers for saving. See
docs/distributed.md for what is guaranteed."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

from grpo_img.sharding import (FSDPSettings, fsdp_settings, full_optimizer_state, full_trainable_state, is_sharded,
                               shard_policy)
from policies.base import Policy

log = logging.getLogger("grpo_img")


def sync_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average gradients over processes. Explicit, because policies call their submodules directly (the
    language model, the image head, ...), so a DDP wrapper's backward hooks would never fire.

    One all-reduce over a flat buffer of every gradient (a per-tensor all-reduce would be hundreds of small calls
    for a LoRA adapter). A parameter that got a gradient on some processes but not on others takes part with zeros
    there; one that got none anywhere keeps no gradient, as in a single process. Parameters sharded by FSDP
    (DTensors, see grpo_img/sharding.py) are left out: FSDP has already reduce-scattered their averaged gradients."""
    params = [p for p in params if not is_sharded(p)]
    if accelerator.num_processes == 1 or not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    has_grad = accelerator.reduce(has_grad, "sum") > 0
    synced = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    if not synced:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in synced])
    flat = accelerator.reduce(flat, "mean")
    offset = 0
    for p in synced:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def check_distributed_type(accelerator: Accelerator) -> FSDPSettings | None:
    """The sharding this launch asks for: FSDP settings (grpo_img/sharding.py), or None for data-parallel.
    DeepSpeed is refused: see docs/distributed.md."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise NotImplementedError(
            "accelerate is configured for DeepSpeed, which this trainer does not support: DeepSpeed needs the model "
            "and optimizer passed through accelerator.prepare together and its engine for backward and the "
            "optimizer step (and ZeRO-3 gathers weights in hooks on the engine's forward, which the policies "
            "bypass by calling their submodules directly). Use configs/accelerate/fsdp.yaml to shard the model, "
            "or a DDP config (ddp.yaml, multi_node_ddp.yaml); see docs/distributed.md.")
    return fsdp_settings(accelerator)


def broadcast_trainable(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Copy process 0's trainable weights to every process. All processes seed identically, so this changes
    nothing when the policy builds deterministically; it guards against a policy whose set-up does not."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def shard_for_training(policy: Policy, sharding: FSDPSettings | None, accelerator: Accelerator) -> None:
    """Under FSDP, shard the policy's decoder layers (after `broadcast_trainable`, before the optimizer is built:
    sharding replaces the layers' parameters)."""
    if sharding is None:
        return
    count = shard_policy(policy, sharding, accelerator.device)
    policy.lockstep = True  # a sharded forward is a collective: loops that may stop early stop together
    log.info("FSDP: %d decoder layers sharded over %d processes (reshard_after_forward=%s)", count,
             accelerator.num_processes, sharding.reshard_after_forward)


def gather_for_saving(policy: Policy, optimizer, sharding: FSDPSettings | None) -> tuple[dict | None, dict | None]:
    """Under FSDP, the full trainable weights and optimizer state for process 0 to write (collective: every
    process calls it); (None, None) otherwise, where process 0 already holds everything."""
    if sharding is None:
        return None, None
    return full_trainable_state(policy.peft_model), full_optimizer_state(policy.peft_model, optimizer)
