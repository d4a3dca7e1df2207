"""Build SEED-X's `negative_image_embeds.pt` from the release's vision tower (not a release file; run once).

    python -m policies.checkpoints.seed_x_negative --vit pretrained/QwenViT/qwen_vit_G.pt \
        --out pretrained/SEED-X-17B/negative_image_embeds.pt

`--vit` is the release's `qwen_vit_G.pt` (the state dict that SEED-X's `src/tools/reload_qwen_vit.py` saves from
Qwen-VL-Chat) or a Qwen-VL-Chat folder itself (its `transformer.visual.*` weights are read from the safetensors or
.bin shards; nothing of Qwen-VL's remote code is run). The result is the tower's output on an all-zero 448 px
image, pooled 4 to 1 to [64, 4096] (policies/modules/qwen_vit.py says how the release does it). The release
computes it in float16 on the GPU; the default here is float32 (`--dtype float16 --device cuda` for the release's
rounding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from policies.modules.qwen_vit import QwenViT, QwenViTConfig, zero_image_features
from policies.modules.seed_x import NUM_IMAGE_TOKENS

QWEN_VL_PREFIX = "transformer.visual."


def read_vision_tower(path: str) -> dict[str, Tensor]:
    """The tower's state dict from a `.pt`/`.bin` file or a Qwen-VL-Chat folder, with the release's names."""
    source = Path(path)
    if source.is_dir():
        index = next((source / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (source / n).exists()), None)
        if index is not None:
            shards = sorted({source / f for k, f in json.loads(index.read_text())["weight_map"].items()
                             if k.startswith(QWEN_VL_PREFIX)})
        else:
            shards = sorted(source.glob("*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
        if not shards:
            raise FileNotFoundError(f"{source}: no safetensors or .bin weights holding {QWEN_VL_PREFIX}* found")
    elif source.is_file():
        shards = [source]
    else:
        raise FileNotFoundError(f"vision tower not found: {source} (give qwen_vit_G.pt or a Qwen-VL-Chat folder)")
    state: dict[str, Tensor] = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            from safetensors.torch import load_file
            part = load_file(shard)
        else:
            part = torch.load(shard, map_location="cpu", weights_only=True)
        state.update(part)
    if any(k.startswith(QWEN_VL_PREFIX) for k in state):
        state = {k[len(QWEN_VL_PREFIX):]: v for k, v in state.items() if k.startswith(QWEN_VL_PREFIX)}
    if "conv1.weight" not in state or "proj" not in state:
        raise ValueError(f"{source}: not a Qwen-VL vision tower (no conv1.weight / proj among {len(state)} keys)")
    return state


def build_negative_embeds(vit_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                          heads: int = 16, pool_heads: int | None = None, image_size: int = 448) -> Tensor:
    """[64, output_dim] float32: the zero-image features of the tower at `vit_path`, pooled as the release pools."""
    state = read_vision_tower(vit_path)
    config = QwenViTConfig.from_state_dict(state, heads=heads, pool_heads=pool_heads, image_size=image_size)
    vit = QwenViT(config)
    vit.load_state_dict(state, strict=True)  # every release name must be there, and nothing else
    vit.to(device=device, dtype=dtype).eval()
    pool = config.num_queries // NUM_IMAGE_TOKENS
    if pool * NUM_IMAGE_TOKENS != config.num_queries:
        raise ValueError(f"the tower has {config.num_queries} queries; SEED-X pools them to {NUM_IMAGE_TOKENS}")
    return zero_image_features(vit, pool).float().cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", required=True, help="qwen_vit_G.pt, or a Qwen-VL-Chat folder")
    parser.add_argument("--out", required=True, help="where to write negative_image_embeds.pt")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=16, help="the tower's attention heads (release: 16)")
    parser.add_argument("--pool-heads", type=int, default=None, help="attention-pool heads (release: output // 128)")
    parser.add_argument("--image-size", type=int, default=448, help="the zero image's size (release: 448)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    negative = build_negative_embeds(args.vit, getattr(torch, args.dtype), args.device, args.heads,
                                     args.pool_heads, args.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(negative, out)
    print(f"wrote {out}: {list(negative.shape)} float32, mean {negative.mean():.4g}, std {negative.std():.4g}")


if __name__ == "__main__":
    main()
