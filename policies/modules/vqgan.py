"""Chameleon's VQGAN image decoder (transformers has only the encoder): the taming-transformers decoder, with the
release checkpoint's module names so that `tokenizer/vqgan.ckpt` loads by identity (policies/checkpoints/vqgan.py).

Structure: conv_in, mid block with attention, up levels of num_res_blocks+1 resnet blocks with nearest x2 + conv
upsampling, GroupNorm-swish-conv_out, driven by the same `vq_config` as transformers' encoder, whose resnet and
attention blocks (and quantizer codebook) it reuses: their shapes and parameter names match the release.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoderAttnBlock as AttnBlock,
    ChameleonVQVAEEncoderResnetBlock as ResnetBlock,
    ChameleonVQVAEVectorQuantizer,
)




class _Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (taming `Upsample(with_conv=True)`); key `upsample.conv.*`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    """taming-transformers `Decoder` (temb_ch 0, no tanh, give_pre_end False), module names as in the release."""

    def __init__(self, config):
        super().__init__()
        mult = list(config.channel_multiplier)
        levels = len(mult)
        attn_resolutions = config.attn_resolutions or []
        use_attn = config.attn_type == "vanilla"
        block_in = config.base_channels * mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(config, block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in) if use_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(config, block_in, block_in)
        up: list[nn.Module] = []
        for level in reversed(range(levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * mult[level]
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(config, block_in, block_out))
                block_in = block_out
                if use_attn and resolution in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = _Upsample(block_in)
                resolution *= 2
            up.insert(0, stage)  # stored as up[level]: up[levels - 1] runs first, as in the release
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.out_channels if hasattr(config, "out_channels") else 3,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


class VQGANDecoder(nn.Module):
    """Codebook indices [B, grid*grid] (row-major) -> pixels [B, 3, H, W], about [-1, 1].

    Submodules `quantize` (transformers' Chameleon quantizer: the codebook), `post_quant_conv` and `decoder` carry
    the release's checkpoint names, so the key mapping is the identity on the keys the decoder needs.
    """

    def __init__(self, vq_config):
        super().__init__()
        self.config = vq_config
        self.quantize = ChameleonVQVAEVectorQuantizer(vq_config)
        self.post_quant_conv = nn.Conv2d(vq_config.embed_dim, vq_config.latent_channels, 1)
        self.decoder = _Decoder(vq_config)
        self.grid = vq_config.resolution // 2 ** (len(vq_config.channel_multiplier) - 1)

    def forward(self, codes: Tensor) -> Tensor:
        if codes.shape[-1] != self.grid * self.grid:
            raise ValueError(f"the decoder takes {self.grid}x{self.grid}={self.grid ** 2} codes per image, "
                             f"got {codes.shape[-1]}")
        # contiguous as released: a permuted (channels-last) latent makes the convolutions round differently
        z = self.quantize.embedding(codes).view(codes.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
        z = z.contiguous()
        return self.decoder(self.post_quant_conv(z))
