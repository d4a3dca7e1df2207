"""BLIP3o-NEXT's image decoder ("environment"): the diffusion connector, then SANA-1.5 under flow-match Euler with
CFG, then DC-AE. Frozen during RL; `forward` keeps autograd only so that the tiny toy world can be fitted through it.

As released (JiuhaiChen/BLIP3o, BLIP3o-NEXT branch): the last-layer hidden states of `<S0>` and the image tokens go
through `diffusion_connector` = Linear(hidden, 2304), tanh-GELU, Linear(2304, 2304), RMSNorm(2304, eps 1e-5); the
null condition is the connector applied to zeros, rows ordered [null, cond]; sigmas linspace(1, 1/steps, steps) on
diffusers' `FlowMatchEulerDiscreteScheduler` (shift 1.0 [inferred]: the release builds the Euler class from a
DPM-Solver config whose `flow_shift` key the Euler class does not read); the timestep handed to Sana is
sigma * 1000 in float32, whatever the model dtype; latents / scaling_factor (+ shift_factor) into the DC-AE.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.normalization import RMSNorm
from torch import Tensor, nn


def build_connector(hidden_size: int, caption_channels: int) -> nn.Sequential:
    """The release's `diffusion_connector` (module indices match its checkpoint keys 0, 2, 3)."""
    norm = RMSNorm(caption_channels, eps=1e-5, elementwise_affine=True)
    with torch.no_grad():
        norm.weight.fill_(math.sqrt(5.5))  # the release's initial value (overwritten by loaded weights)
    return nn.Sequential(nn.Linear(hidden_size, caption_channels), nn.GELU(approximate="tanh"),
                         nn.Linear(caption_channels, caption_channels), norm)


def flow_scheduler(steps: int, shift: float = 1.0, device: torch.device | str | None = None
                   ) -> FlowMatchEulerDiscreteScheduler:
    """The release's schedule: sigmas linspace(1, 1/steps, steps) (shifted), timesteps sigma * 1000, then 0."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=device, sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return scheduler


class DiffusionDecoder(nn.Module):
    """Frozen connector + SanaTransformer2DModel + AutoencoderDC."""

    def __init__(self, connector: nn.Sequential, sana: nn.Module, vae: nn.Module):
        super().__init__()
        self.connector, self.sana, self.vae = connector, sana, vae

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.sana.config.sample_size
        return (self.sana.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        return self.sana.config.sample_size * 2 ** (len(self.vae.config.decoder_block_out_channels) - 1)

    def forward(self, hidden: Tensor, noise: Tensor, guidance_scale: float, steps: int, shift: float = 1.0) -> Tensor:
        """hidden [B, L, H] last-layer states, noise [B, C, S, S] -> pixels [B, 3, H, W], about [-1, 1]."""
        dtype = next(self.sana.parameters()).dtype
        hidden = hidden.to(next(self.connector.parameters()).dtype)
        context = self.connector(torch.cat([torch.zeros_like(hidden), hidden])).to(dtype)
        scheduler = flow_scheduler(steps, shift, noise.device)
        latents = noise.to(dtype)
        for t in scheduler.timesteps:
            velocity = self.sana(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=context,
                                 timestep=t.expand(2 * len(latents)), return_dict=False)[0]
            null, cond = velocity.float().chunk(2)
            # the Euler step in float32, then back to the model dtype
            latents = scheduler.step(null + guidance_scale * (cond - null), t, latents, return_dict=False)[0].to(dtype)
        config = self.vae.config
        latents = latents.to(next(self.vae.parameters()).dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]
