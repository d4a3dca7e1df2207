"""Loading helpers shared by the model-based rewards: device/dtype choice, open_clip models, checkpoint files.

Release facts relied on (open_clip_torch 3.3):
- `open_clip.create_model_and_transforms(name, pretrained=tag|file|None, force_quick_gelu=...)`; names may be
  built-in (`ViT-L-14`), `hf-hub:org/repo` or `local-dir:/path` (a folder with `open_clip_config.json` holding
  `model_cfg`/`preprocess_cfg` and `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`).
- OpenAI's CLIP weights were trained with QuickGELU. open_clip 3.3 builds `("ViT-L-14", "openai")` with plain GELU
  and only warns; the pretrained config of the tag says `quick_gelu: True`, so we read it and force QuickGELU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: this process's current CUDA device (the one accelerate gave the policy), else CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: bfloat16 on CUDA (the trainer's default precision there), float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def open_clip_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the released weights of (model, tag) were trained with QuickGELU (open_clip's pretrained config)."""
    import open_clip

    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return False  # those carry their own model config, activation included
    if model_name.endswith("-quickgelu"):
        return True
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype,
                   quick_gelu: bool | None = None):
    """(model in eval mode on device/dtype, val preprocess, tokenizer). `quick_gelu=None` follows the weights."""
    import open_clip

    if quick_gelu is None:
        quick_gelu = open_clip_quick_gelu(model_name, pretrained)
    if pretrained and not model_name.startswith(("hf-hub:", "local-dir:")) and Path(pretrained).suffix == "" \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}; known: "
                         f"{open_clip.list_pretrained_tags_by_model(model_name)} (or pass a weights file path)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained or None, device=device, force_quick_gelu=quick_gelu)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def checkpoint_file(spec: str) -> str:
    """A local file, or `org/repo/filename` on the Hugging Face hub, or an https URL; returns a local path."""
    if os.path.isfile(spec):
        return spec
    if spec.startswith(("http://", "https://")):
        from torch.hub import download_url_to_file, get_dir

        target = Path(get_dir()) / "checkpoints" / Path(spec).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            download_url_to_file(spec, str(target))
        return str(target)
    parts = spec.split("/")
    if len(parts) < 3 or spec.startswith(("/", ".", "~")) or os.path.isdir(os.path.dirname(spec)):
        raise FileNotFoundError(f"checkpoint {spec!r} is neither a local file nor 'org/repo/filename' on the hub")
    from huggingface_hub import hf_hub_download

    return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file; unwraps a `state_dict` entry and DDP's `module.` prefix."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict that names what is missing or unexpected instead of half-loading."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint does not fit the model; missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{where}: shape mismatch for {bad[:8]}, e.g. {bad[0]}: checkpoint "
                         f"{tuple(state[bad[0]].shape)} vs model {tuple(expected[bad[0]].shape)}")
    module.load_state_dict(state)


def image_features(output) -> torch.Tensor:
    """transformers 5.x `get_image_features`/`get_text_features` return a ModelOutput; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
