"""HPSv2 / HPSv2.1 (Human Preference Score v2) on mainline open_clip, without the `hpsv2` package.

Release facts: HPSv2 is a fine-tuned open_clip `ViT-H-14` (base `laion2B-s32B-b79K`, GELU). The released
checkpoints `HPS_v2_compressed.pt` and `HPS_v2.1_compressed.pt` live on the hub repo `xswu/HPSv2`; each is a torch
file whose `state_dict` entry holds the whole CLIP model's weights. The `hpsv2` package builds the model with its
own open_clip fork and downloads the base weights first; we build the same architecture with `pretrained=None`
(the checkpoint overwrites every weight, so the base weights are not needed) and load the `state_dict` strictly,
naming any missing or unexpected key. Score = cos(normalised image features, normalised text features): no
logit scale, no rescaling (the package's `hps_score`). Typical values are 0.2-0.35.

Deviation: we preprocess with open_clip's val transform (short-side resize + centre crop); the package resizes the
long side and pads. For the square images a policy produces the two are the same.
"""

from __future__ import annotations

import torch

from rewards.base import Reward
from rewards.models import (batches, checkpoint_file, load_open_clip, load_state_dict, load_strict, resolve_device,
                            resolve_dtype)

HPS_CHECKPOINTS = {"v2": "xswu/HPSv2/HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt"}


class HPSv2Reward(Reward):
    name = "hpsv2"

    def __init__(self, checkpoint: str = "v2.1", model_name: str = "ViT-H-14", batch_size: int = 16,
                 device: str | None = None, dtype: str | None = None):
        """`checkpoint`: "v2" / "v2.1" (the released files on the hub), a local file, or `org/repo/filename`."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        path = checkpoint_file(HPS_CHECKPOINTS.get(checkpoint, checkpoint))
        model, self.preprocess, self.tokenizer = load_open_clip(model_name, None, torch.device("cpu"),
                                                                torch.float32, quick_gelu=False)
        load_strict(model, load_state_dict(path), f"HPSv2 checkpoint {path}")
        self.model = model.to(self.device, self.dtype)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        scores = []
        for part in batches(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[part]])
            image = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            text = self.model.encode_text(self.tokenizer(prompts[part]).to(self.device), normalize=True)
            scores += (image.float() * text.float()).sum(-1).cpu().tolist()
        return scores
