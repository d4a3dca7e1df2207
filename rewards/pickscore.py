"""PickScore (Kirstain et al. 2023) on transformers' CLIPModel.

Release facts: model `yuvalkirstain/PickScore_v1` (a fine-tuned CLIP ViT-H/14, transformers format); its processor
is the base model's, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (CLIP image processor: resize 224, centre crop, CLIP
mean/std; text padded and truncated to 77 tokens). Score = logit_scale.exp() · cos(image, text) (logit scale
≈ 100), typically 18-23; Flow-GRPO divides it by 26 for training, which is our default (`divide_by=26`).

transformers 5.x: `get_image_features`/`get_text_features` return a ModelOutput whose `pooler_output` is the projected
embedding (Flow-GRPO's code, written for 4.x, calls `.norm()` on it and breaks); see `rewards.models.image_features`.
"""

from __future__ import annotations

import torch

from rewards.base import Reward
from rewards.models import batches, image_features, resolve_device, resolve_dtype


class PickScoreReward(Reward):
    name = "pickscore"

    def __init__(self, model_name_or_path: str = "yuvalkirstain/PickScore_v1",
                 processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", divide_by: float = 26.0,
                 batch_size: int = 16, device: str | None = None, dtype: str | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.image_processor = AutoImageProcessor.from_pretrained(processor_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path, dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        if divide_by <= 0:
            raise ValueError(f"divide_by must be positive, got {divide_by}")
        self.divide_by = float(divide_by)
        self.batch_size = batch_size

    @torch.no_grad()
    def raw_scores(self, images, prompts) -> torch.Tensor:
        """logit_scale.exp() · cos per pair (the released PickScore), float32 on CPU."""
        out = []
        for part in batches(len(images), self.batch_size):
            pixels = self.image_processor(images=[im.convert("RGB") for im in images[part]],
                                          return_tensors="pt")["pixel_values"]
            text = self.tokenizer(prompts[part], padding=True, truncation=True, max_length=77, return_tensors="pt")
            image = image_features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            txt = image_features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                              attention_mask=text["attention_mask"].to(self.device)))
            cos = torch.nn.functional.cosine_similarity(image.float(), txt.float(), dim=-1)
            out.append((self.model.logit_scale.float().exp() * cos).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images, prompts, metadata):
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        return (self.raw_scores(images, prompts) / self.divide_by).tolist()
