"""The Qwen-VL ViT-G vision tower (`VisionTransformerWithAttnPool`), only to compute SEED-X's negative branch.

SEED-X's de-tokenizer guides with the features of an all-zero image: the release
(`src/models/detokenizer/adapter_modules.py`, `SDXLAdapter.get_image_embeds` with `image_embeds=`) runs this tower
on `zeros(1, 3, 448, 448)` (zero in the already normalised input space, not a black picture), average-pools its 256
output tokens 4 to 1 along the sequence (`vit_down: True` in the de-tokenizer config) and de-tokenizes the
64 x 4096 result. That result depends on the weights only, so `policies/checkpoints/seed_x_negative.py` computes it
once and the policy loads it as `negative_image_embeds.pt`.

The parameter names are the release's (`src/models/tokenizer/qwen_visual.py`, the same as Qwen-VL-Chat's
`transformer.visual.*`), so its state dict (`qwen_vit_G.pt`, written by the release's `src/tools/reload_qwen_vit.py`)
loads strictly. Release sizes: 448 px, patch 14, width 1664, 48 layers, 16 heads, MLP 8192, 256 queries,
output 4096 with 32 pooling heads (output // 128), LayerNorm eps 1e-6, exact GELU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.modules.seed_x import sincos_2d


@dataclass
class QwenViTConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_width: int = 8192  # int(1664 * 4.9231) in the release's config
    num_queries: int = 256
    output_dim: int = 4096
    pool_heads: int = 32  # the release's output_dim // 128

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], heads: int = 16, pool_heads: int | None = None,
                        image_size: int = 448) -> "QwenViTConfig":
        """Sizes read off the weights; the head counts are not in them (release: 16, and output // 128)."""
        width, _, patch, _ = state["conv1.weight"].shape
        output_dim = state["proj"].shape[0]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        return cls(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads,
                   mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                   num_queries=state["attn_pool.query"].shape[0], output_dim=output_dim,
                   pool_heads=pool_heads or output_dim // 128)


def resize_positions(positions: Tensor, num_tokens: int) -> Tensor:
    """A square grid of learned positions [L, C] resized bicubically (in float32) to `num_tokens` [M, C], as the
    release's `get_abs_pos` does: the tower keeps 16 x 16 positions and sees 32 x 32 patches at 448 px."""
    source, target = math.isqrt(positions.shape[0]), math.isqrt(num_tokens)
    if source == target:
        return positions
    grid = positions.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(positions.dtype)


class VisualAttention(nn.Module):
    """Self-attention with one fused `in_proj` whose output is split per head as [q | k | v] (the release's
    layout: heads outermost, unlike nn.MultiheadAttention's)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # [B, L, width]
        b, n, width = x.shape
        q, k, v = self.in_proj(x).view(b, n, self.heads, 3 * (width // self.heads)).chunk(3, dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // self.heads), dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, width))


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: QwenViTConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(config.width, config.heads, config.mlp_width)
                                       for _ in range(config.layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class AttentionPoolResampler(nn.Module):
    """`attn_pool`: `num_queries` learned queries (+ fixed sin-cos positions) cross-attend to the patch tokens
    (+ the same positions resized to the patch grid)."""

    def __init__(self, config: QwenViTConfig):
        super().__init__()
        dim = config.output_dim
        self.pos_embed = nn.Parameter(sincos_2d(dim, math.isqrt(config.num_queries)), requires_grad=False)
        self.query = nn.Parameter(torch.randn(config.num_queries, dim) * 0.02)
        self.kv_proj = nn.Linear(config.width, dim, bias=False) if config.width != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, config.pool_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:  # [B, patches, width] -> [B, num_queries, output_dim]
        key_positions = resize_positions(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(q, x + key_positions, x, need_weights=False)[0]


class QwenViT(nn.Module):
    def __init__(self, config: QwenViTConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, w) * w**-0.5)  # 16 x 16, resized per input
        self.ln_pre = nn.LayerNorm(w, eps=1e-6)
        self.transformer = Transformer(config)
        self.attn_pool = AttentionPoolResampler(config)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(config.output_dim, config.output_dim) * config.output_dim**-0.5)

    def forward(self, pixels: Tensor) -> Tensor:  # normalised [B, 3, H, W] -> [B, num_queries, output_dim]
        x = self.conv1(pixels.to(self.proj.dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj


def zero_image_features(vit: QwenViT, pool: int = 4) -> Tensor:
    """SEED-X's negative-branch features [num_queries // pool, output_dim]: the tower on an all-zero normalised
    image, then consecutive tokens averaged `pool` to 1 (the release's `F.avg_pool1d(kernel_size=4, stride=4)`)."""
    size = vit.config.image_size
    with torch.no_grad():
        features = vit(torch.zeros(1, 3, size, size, device=vit.proj.device, dtype=vit.proj.dtype))
        pooled = F.avg_pool1d(features.transpose(1, 2), kernel_size=pool, stride=pool).transpose(1, 2)
    return pooled[0]
