"""FSDP for the LoRA GRPO trainer: the language model's decoder layers sharded with FSDP2 (`fully_shard`).

Why per layer, and not a wrapper around the model: policies call their submodules directly (Janus runs
`model.model.language_model(...)` then `generation_head`), so hooks on a root wrapper would never fire. A decoder
layer, in contrast, is called by every path that runs the language model, so `fully_shard` on each layer gathers
that layer's weights (frozen base and LoRA alike) in its own pre-forward hook and, after backward, reduce-scatters
the LoRA gradients, averaged over processes, into the local shards. Each layer is its own FSDP root; there is no
root over the model.

Everything else stays replicated (embeddings, norms, image heads, VQ/diffusion decoders, the vision tower): those
are small next to the decoder stack or are used outside the training graph. Trainable parameters outside the
layers (peft `modules_to_save` heads) are averaged by the trainer's explicit all-reduce (`sync_gradients`), which
skips the sharded ones (DTensors).

Costs, stated: with `reshard_after_forward=True` (the default, and the memory saving) every forward of a layer
all-gathers it, and KV-cached sampling runs one forward per image token: T all-gathers of every layer per rollout
(576 for Janus-Pro), against one per micro-batch in scoring. `reshard_after_forward=False` (accelerate's
`fsdp_reshard_after_forward: false`) keeps the gathered layers after their first forward, which makes sampling
gather once, at the price of holding the full weights on every process between forward and backward (ZeRO-2-like
memory for parameters, still sharded gradients and optimizer states). In between, the trainer's
`fsdp_gather_for_sampling: true` keeps the layers gathered during sampling only (`kept_gathered`): one all-gather
per layer per rollout, full weights held while sampling (no activations are stored then), sharded again for
scoring and backward.

Saving gathers full tensors of the trainable parameters only (`full_trainable_state`), so the adapter is a plain
peft adapter; the optimizer state is saved in the full, name-keyed form of `torch.distributed.checkpoint` and
loaded back with `set_optimizer_state_dict` (that layout does not depend on the number of processes; resuming
on another number than was saved is untested).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

# accelerate's FSDP options (config name without "fsdp_") that this trainer does not implement, with the reason
_REFUSED = {
    "offload_params": "parameter offload to CPU is not implemented for the per-layer sharding",
    "cpu_ram_efficient_loading": ("it makes transformers load real weights on process 0 only, and the per-layer "
                                  "sharding takes each process's own copy; set fsdp_cpu_ram_efficient_loading: "
                                  "false"),
    "activation_checkpointing": "use the trainer's `gradient_checkpointing: true` instead",
}


@dataclass(frozen=True)
class FSDPSettings:
    """What the trainer takes from accelerate's FSDP plugin."""

    reshard_after_forward: bool = True
    #: class names of the layers to shard; empty: the policy's own `decoder_layers()`
    layer_classes: tuple[str, ...] = ()


def fsdp_settings(accelerator) -> FSDPSettings | None:
    """The FSDP settings of this launch, or None when the launch does not ask for FSDP.

    On GPUs accelerate reports `DistributedType.FSDP`. On CPU (gloo, `ACCELERATE_USE_CPU=true`, what CI runs)
    it reports MULTI_CPU and drops the plugin, so the launcher's ACCELERATE_USE_FSDP / FSDP_* variables are read
    the way accelerate itself reads them (`FullyShardedDataParallelPlugin()`).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        if accelerator.distributed_type != DistributedType.FSDP \
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return None
        plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise NotImplementedError(f"FSDP version {plugin.fsdp_version} is not supported: the trainer shards with "
                                  "FSDP2 (torch's fully_shard); set `fsdp_version: 2` in the accelerate config "
                                  "(configs/accelerate/fsdp.yaml)")
    from torch.distributed.fsdp import CPUOffloadPolicy

    chosen = {"offload_params": isinstance(plugin.cpu_offload, CPUOffloadPolicy),
              "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
              "activation_checkpointing": bool(plugin.activation_checkpointing)}
    for option, why in _REFUSED.items():
        if chosen[option]:
            raise NotImplementedError(f"FSDP option fsdp_{option} is not supported by this trainer: {why}")
    wrap = plugin.auto_wrap_policy
    if wrap is not None and getattr(wrap, "__name__", "") == "size_based_auto_wrap_policy":
        raise NotImplementedError("fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported: the trainer shards "
                                  "the language model's decoder layers (TRANSFORMER_BASED_WRAP)")
    return FSDPSettings(reshard_after_forward=bool(plugin.reshard_after_forward),
                        layer_classes=tuple(plugin.transformer_cls_names_to_wrap or ()))


def layers_to_shard(policy, settings: FSDPSettings) -> list[nn.Module]:
    """The policy's decoder layers, or the modules of the classes named in the accelerate config."""
    if settings.layer_classes:
        wanted = set(settings.layer_classes)
        layers = [m for m in policy.model.modules() if type(m).__name__ in wanted]
        if not layers:
            found = sorted({type(m).__name__ for m in policy.model.modules() if type(m).__name__.endswith("Layer")})
            raise ValueError(f"fsdp_transformer_layer_cls_to_wrap {sorted(wanted)} matches no module of policy "
                             f"{policy.name!r} (its layer classes: {found}); leave it unset to let the policy "
                             "name its decoder layers")
        return layers
    layers = policy.decoder_layers()
    if not layers:
        raise ValueError(f"policy {policy.name!r} names no decoder layers to shard (Policy.decoder_layers() is "
                         "empty); override it in the family's file or set fsdp_transformer_layer_cls_to_wrap")
    return layers


def shard_policy(policy, settings: FSDPSettings, device: torch.device) -> int:
    """`fully_shard` every decoder layer of the policy in place (after LoRA is added and the trainable weights are
    broadcast, before the optimizer is built: the layers' parameters become new DTensor parameters). Returns the
    number of sharded layers."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = layers_to_shard(policy, settings)
    for layer in layers:
        # explicit: a layer is its own FSDP root, and FSDP2 keeps a root's weights gathered after forward unless
        # told otherwise (reshard_after_forward=None)
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
        layer.grpo_reshard_after_forward = settings.reshard_after_forward  # restored by kept_gathered
    return len(layers)


@contextlib.contextmanager
def kept_gathered(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, a sharded layer stays gathered after its first forward (one all-gather per layer instead
    of one per forward: for KV-cached sampling); resharded on exit. A no-op for a model without sharded layers."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(getattr(layer, "grpo_reshard_after_forward", True), recurse=False)


def is_sharded(param: torch.Tensor) -> bool:
    """A parameter that FSDP manages (a DTensor shard): its gradient is reduced by FSDP itself."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one. Collective for a DTensor: every process must call it."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_trainable_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters, named as in `peft_model.state_dict()` (what peft's
    `save_pretrained(state_dict=...)` filters). Collective: every process calls it (one all-gather per sharded
    parameter, in the same order everywhere); process 0 gets the tensors, the others an empty dict. Frozen weights
    are not gathered: the adapter is all that is saved."""
    import torch.distributed as dist

    main = dist.get_rank() == 0
    state = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            full = full_tensor(param.detach())
            if main:
                state[name] = full.cpu().clone()
    return state


def full_optimizer_state(peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, keyed by parameter name. Collective; process 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(peft_model, _unwrap(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(peft_model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `full_optimizer_state`'s output into a sharded run (every process holds the loaded file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(peft_model, _unwrap(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the torch one


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over a mix of sharded (DTensor) and replicated parameters, which torch's
    own refuses ("mixed torch.Tensor and DTensor"): the sharded part's norm is reduced over processes, the
    replicated part's is the same everywhere (its gradients are already averaged). Returns the total norm, equal
    on every process."""
    sharded = [p for p in params if p.grad is not None and is_sharded(p)]
    plain = [p for p in params if p.grad is not None and not is_sharded(p)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(plain, max_norm)
    norms = [full_tensor(torch.nn.utils.get_total_norm([p.grad for p in sharded]))]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
