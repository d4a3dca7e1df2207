"""CLIP score on open_clip: 100 * cos(image embedding, prompt embedding), divided by `divide_by`.

Release facts: the default is CLIP ViT-L/14 with OpenAI's weights (open_clip tag `openai`, hub
`timm/vit_large_patch14_clip_224.openai`), the model Flow-GRPO's CLIPScore uses (as transformers'
`openai/clip-vit-large-patch14`). Those weights were trained with QuickGELU; open_clip 3.3 would silently build
GELU for `("ViT-L-14", "openai")`, so the activation follows the tag's pretrained config (see rewards/models.py).
Preprocessing is open_clip's val transform for the model (bicubic short-side resize, centre crop, CLIP mean/std).

Scale: the raw value is 100·cos, in [-100, 100], typically 15-35 for real images; Flow-GRPO divides by 30 for
training, which is our default (`divide_by=30`), so rewards are O(1). `divide_by=1` gives the usual CLIPScore
number (without Hessel et al.'s 2.5·max(cos, 0) variant).
"""

from __future__ import annotations

import torch
from PIL import Image

from rewards.base import Reward
from rewards.models import batches, load_open_clip, resolve_device, resolve_dtype


class CLIPScoreReward(Reward):
    name = "clip"

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", divide_by: float = 30.0,
                 quick_gelu: bool | None = None, batch_size: int = 32, device: str | None = None,
                 dtype: str | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.preprocess, self.tokenizer = load_open_clip(model_name, pretrained, self.device,
                                                                     self.dtype, quick_gelu)
        if divide_by <= 0:
            raise ValueError(f"divide_by must be positive, got {divide_by}")
        self.divide_by = float(divide_by)
        self.batch_size = batch_size

    @torch.no_grad()
    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """cos(image, prompt) per pair, float32 on CPU."""
        out = []
        for part in batches(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[part]])
            image = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            text = self.model.encode_text(self.tokenizer(prompts[part]).to(self.device), normalize=True)
            out.append((image.float() * text.float()).sum(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts, metadata):
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        return (100.0 * self.cosine(images, prompts) / self.divide_by).tolist()
