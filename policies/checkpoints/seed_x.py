"""SEED-X's released layout: every piece loaded from a local folder, a missing one named at once.

    DIR/llm/                                              HF Llama folder
    DIR/agent/pytorch_model.bin                           `output_resampler.*`
    cvlm_llama2_tokenizer_100img_and_224loc_addpatch/     tokenizer (DIR or its parent)
    seed_detokenizer/first_stage/pytorch_model.bin        `resampler.*` and the fine-tuned UNet `to_k`/`to_v`
    sdxl/ (or `sdxl_path`, default the SDXL base hub id)  diffusers folders unet/, vae/, scheduler/
    negative_image_embeds.pt (or `negative_embeds_path`)  [64, 4096] ViT-G features of the zero image
                                                          (python -m policies.checkpoints.seed_x_negative)
    seed_x_policy.json (optional)                         our module sizes and decode settings (defaults: release)
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from policies.modules.seed_x import NUM_IMAGE_TOKENS, OutputResampler, ResamplerXLV2, SeedXConfig

TOKENIZER_DIR = "cvlm_llama2_tokenizer_100img_and_224loc_addpatch"
DETOKENIZER_FILE = "seed_detokenizer/first_stage/pytorch_model.bin"
AGENT_FILE = "agent/pytorch_model.bin"
NEGATIVE_FILE = "negative_image_embeds.pt"
CONFIG_FILE = "seed_x_policy.json"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def is_kv_weight(key: str) -> bool:
    return key.endswith(("to_k.weight", "to_v.weight"))


def _find(root: Path, relative: str) -> Path | None:
    for base in (root, root.parent):
        if (base / relative).exists():
            return base / relative
    return None


def load_released(model_path: str, tokenizer_path: str | None, detokenizer_path: str | None, sdxl_path: str | None,
                  negative_embeds_path: str | None, overrides: dict) -> dict:
    """The pieces of `SeedXPolicy.__init__` from the released layout; every missing piece is named at once."""
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"SEED-X folder not found: {root} (hub ids are not supported: download the release "
                                "and give the variant folder, e.g. SEED-X-17B/seed_x_i)")
    pieces = {
        "llm (HF Llama folder)": root / "llm" / "config.json" if (root / "llm" / "config.json").exists() else None,
        f"agent ({AGENT_FILE})": _find(root, AGENT_FILE),
        f"tokenizer ({TOKENIZER_DIR}/)": Path(tokenizer_path) if tokenizer_path else _find(root, TOKENIZER_DIR),
        f"de-tokenizer ({DETOKENIZER_FILE})": Path(detokenizer_path) if detokenizer_path
        else _find(root, DETOKENIZER_FILE),
        f"negative branch features ({NEGATIVE_FILE}: the Qwen-VL ViT-G features of an all-zero 448 px image, "
        "pooled to 64 x 4096; build it with python -m policies.checkpoints.seed_x_negative --vit qwen_vit_G.pt "
        f"--out {root.parent / NEGATIVE_FILE})": Path(negative_embeds_path) if negative_embeds_path else _find(root, NEGATIVE_FILE),
    }
    missing = [f"{name} under {root} or {root.parent}" for name, p in pieces.items() if p is None or not p.exists()]
    if missing:
        raise FileNotFoundError("SEED-X checkpoint is incomplete; missing: " + "; ".join(missing))
    _, agent_file, tokenizer_dir, detok_file, negative_file = pieces.values()

    config_file = _find(root, CONFIG_FILE)
    values = json.loads(config_file.read_text()) if config_file else {}
    unknown = set(values) - {f.name for f in fields(SeedXConfig)}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {config_file}")
    config = SeedXConfig(**{**values, **overrides})

    llm = LlamaForCausalLM.from_pretrained(root / "llm")
    tokenizer = load_tokenizer(tokenizer_dir)

    output_resampler = OutputResampler(config.output_resampler_dim, config.output_resampler_heads,
                                       llm.config.hidden_size)
    _load_prefixed(output_resampler, torch.load(agent_file, map_location="cpu", weights_only=True),
                   "output_resampler.", agent_file)

    detok = torch.load(detok_file, map_location="cpu", weights_only=True)
    resampler = ResamplerXLV2(config.detokenizer_dim, config.detokenizer_depth, config.detokenizer_dim_head,
                              config.detokenizer_heads, NUM_IMAGE_TOKENS, config.output_resampler_dim,
                              config.prompt_dim_1, config.prompt_dim_2,
                              normalize=config.detokenizer_normalize)
    _load_prefixed(resampler, detok, "resampler.", detok_file)

    sdxl = sdxl_path or (str(root / "sdxl") if (root / "sdxl").is_dir() else SDXL_BASE)
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sdxl, subfolder="vae")
    scheduler = EulerDiscreteScheduler.from_pretrained(sdxl, subfolder="scheduler")
    unet_weights = {k[len("unet."):]: v for k, v in detok.items() if k.startswith("unet.")}
    unet_keys = set(unet.state_dict())
    unexpected = sorted(set(unet_weights) - unet_keys)
    missing_kv = sorted(k for k in unet_keys if is_kv_weight(k) and k not in unet_weights)
    if unexpected or missing_kv:
        raise ValueError(f"{detok_file}: UNet keys do not match the SDXL UNet at {sdxl}: "
                         f"unexpected {unexpected[:3]}, missing fine-tuned to_k/to_v {missing_kv[:3]} "
                         f"({len(unexpected)} / {len(missing_kv)} in all)")
    unet.load_state_dict(unet_weights, strict=False)

    negative = torch.load(negative_file, map_location="cpu", weights_only=True).float()
    if negative.shape != (NUM_IMAGE_TOKENS, config.output_resampler_dim):
        raise ValueError(f"{negative_file}: expected [{NUM_IMAGE_TOKENS}, {config.output_resampler_dim}] "
                         f"negative features, got {list(negative.shape)}")
    return dict(llm=llm, tokenizer=tokenizer, output_resampler=output_resampler, resampler=resampler, unet=unet,
                vae=vae, scheduler=scheduler, negative_vit_embeds=negative, config=config)


def load_tokenizer(folder: Path):
    """The release's slow LLaMA tokenizer (`tokenizer.model` + `added_tokens.json`), converted by transformers
    with sentencepiece (a dependency of grpo-img; named here because its absence surfaces as a tiktoken error)."""
    if (folder / "tokenizer.model").exists() and not (folder / "tokenizer.json").exists():
        try:
            import sentencepiece  # noqa: F401
        except ImportError as error:
            raise ImportError(f"{folder} is a sentencepiece tokenizer: pip install sentencepiece") from error
    return AutoTokenizer.from_pretrained(folder)


def _load_prefixed(module: nn.Module, state: dict, prefix: str, source: Path) -> None:
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: keys under {prefix!r} do not match: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")
    module.load_state_dict(weights)
