"""SEED-X's networks between the LLM and SDXL, with the release's parameter names so that its state dicts load as
they are: the output resampler (Qwen-VL style: 64 learned queries over the LLM's hidden states, fixed 2-D sin-cos
positions) and the de-tokenizer's perceiver resampler `ResamplerXLV2` (-> SDXL prompt and pooled embeddings).
`SeedXConfig` holds their sizes and the decode settings; the defaults are the release's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_IMAGE_TOKENS = 64  # the forced image tokens whose hidden states the output resampler reads


@dataclass
class SeedXConfig:
    """Module sizes and decode settings; the defaults are the release's."""

    output_resampler_dim: int = 4096
    output_resampler_heads: int = 32
    detokenizer_dim: int = 1024
    detokenizer_depth: int = 4
    detokenizer_dim_head: int = 64
    detokenizer_heads: int = 16
    prompt_dim_1: int = 768  # CLIP-L part of SDXL's prompt_embeds
    prompt_dim_2: int = 1280  # OpenCLIP-G part, also the pooled size
    # F.normalize of the de-tokenizer's input features: False in the release's de-tokenizer config
    # (configs/sdxl_adapter/sdxl_qwen_vit_resampler_l4_q64_pretrain_no_normalize.yaml; its class defaults to True)
    detokenizer_normalize: bool = False
    # the release's text-to-image scripts (src/inference/eval_text2img_seed_x{,_i}.py) pass 50;
    # SDXLAdapter.generate's own default is 30
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    image_size: int = 1024
    prompt_format: str = "instruct"

    def __post_init__(self) -> None:
        if self.prompt_format not in ("instruct", "caption"):
            raise ValueError(f"prompt_format must be 'instruct' or 'caption', got {self.prompt_format!r}")


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions [grid*grid, dim]: first half the column index, second the row (MAE / Qwen-VL
    layout). Only an initial value: the released state dict carries them as `pos_embed`."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return torch.from_numpy(np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)).float()


class OutputResampler(nn.Module):
    """One cross-attention layer: `num_queries` learned queries over the LLM's 64 hidden states."""

    def __init__(self, embed_dim: int, num_heads: int, kv_dim: int, num_queries: int = NUM_IMAGE_TOKENS):
        super().__init__()
        grid = int(math.isqrt(num_queries))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, 64, kv_dim] -> [B, Q, embed_dim]
        if x.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(f"output resampler expects {self.pos_embed.shape[0]} hidden states, got {x.shape[1]}")
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(q, x + self.pos_embed, x, need_weights=False)[0]


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        split = lambda t: t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(latents))
        k, v = (split(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        weight = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(self.dim_head), dim=-1).to(q.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


class AttentionPool(nn.Module):
    """Attention pooling of the latents into one vector (query: their mean), for SDXL's pooled embedding."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        b, n, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(b, d))


class ResamplerXLV2(nn.Module):
    """The de-tokenizer's perceiver resampler: 64 x 4096 image features -> SDXL (prompt_embeds, pooled)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output1_dim: int, output2_dim: int, ff_mult: int = 4, normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                         nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))
        self.unet_proj_1 = nn.Linear(dim, output1_dim)
        self.unet_proj_2 = nn.Linear(dim, output2_dim)
        self.unet_attnpool = AttentionPool(num_queries, dim, heads, output2_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latents = self.latents.expand(x.shape[0], -1, -1)
        if self.normalize:  # over dim 1 (the 64 tokens), as the release's class does when its config asks for it
            x = F.normalize(x)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        hidden = self.norm_out(latents)
        prompt_embeds = torch.cat([self.unet_proj_1(hidden), self.unet_proj_2(hidden)], dim=-1)
        return prompt_embeds, self.unet_attnpool(hidden)
