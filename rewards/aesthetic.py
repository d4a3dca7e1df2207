"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): an MLP on CLIP ViT-L/14 image embeddings.

Release facts: the CLIP is OpenAI's ViT-L/14 (transformers `openai/clip-vit-large-patch14`); the image embedding
(projected, 768-d) is L2-normalised and fed to an MLP 768→1024→128→64→16→1 with dropout 0.2, 0.2, 0.1 between the
first layers and **no activations** (state-dict keys `layers.{0,2,4,6,7}.{weight,bias}`). The weights,
`sac+logos+ava1-l14-linearMSE.pth` (3.7 MB), are in the GitHub repo `christophschuhmann/improved-aesthetic-predictor`
(also copied into Flow-GRPO's `flow_grpo/assets/`), not on PyPI or the hub; `head` takes a local file, a URL or
`org/repo/filename`. The score is the raw MLP output on the AVA 1-10 scale (typically 4-7); Flow-GRPO uses it
unscaled and so do we. The prompt is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.base import Reward
from rewards.models import (batches, checkpoint_file, image_features, load_state_dict, load_strict, resolve_device,
                            resolve_dtype)

RELEASED_HEAD = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class AestheticReward(Reward):
    name = "aesthetic"

    def __init__(self, clip_name_or_path: str = "openai/clip-vit-large-patch14", head: str = RELEASED_HEAD,
                 batch_size: int = 32, device: str | None = None, dtype: str | None = None):
        from transformers import AutoImageProcessor, CLIPModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.image_processor = AutoImageProcessor.from_pretrained(clip_name_or_path)
        self.clip = CLIPModel.from_pretrained(clip_name_or_path, dtype=self.dtype).to(self.device).eval()
        self.clip.requires_grad_(False)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        path = checkpoint_file(head)
        load_strict(self.mlp, load_state_dict(path), f"aesthetic head {path}")
        self.mlp = self.mlp.to(self.device).eval().requires_grad_(False)  # float32: 3.7 MB, keeps the head exact
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        scores = []
        for part in batches(len(images), self.batch_size):
            pixels = self.image_processor(images=[im.convert("RGB") for im in images[part]],
                                          return_tensors="pt")["pixel_values"]
            emb = image_features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            emb = nn.functional.normalize(emb.float(), dim=-1)
            scores += self.mlp(emb).squeeze(-1).cpu().tolist()
        return scores
