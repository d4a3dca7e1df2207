"""BLIP3o-NEXT's release checkpoint without the original repository: one state dict (Qwen3 keys, `model.sana.*`,
`model.sana_vae.*`, `model.diffusion_connector.*`), config.json with the release's id fields, the tokenizer; the Sana
and DC-AE configs come from the Sana repo named by `diffusion_name_or_path` (or our layout's `sana/`, `sana_vae/`).
Keys text-to-image never uses are skipped: `model.vision_tower.*` (TA-Tok) and `model.vae_connector.*`. Modules are
built on the meta device and the checkpoint tensors assigned, so nothing is randomly initialised twice, and a
parameter the checkpoint lacks fails loudly by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderDC, SanaTransformer2DModel
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from policies.modules.sana_decoder import DiffusionDecoder, build_connector

DEFAULT_DIFFUSION_REPO = "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"
# config.json fields of the release that the policy reads
RELEASE_ID_FIELDS = ("image_start_tag_id", "image_end_tag_id", "image_start_token_id", "scale_start_token_id")
# checkpoint prefixes
SANA_PREFIX, VAE_PREFIX, CONNECTOR_PREFIX = "model.sana.", "model.sana_vae.", "model.diffusion_connector."
UNUSED_PREFIXES = ("model.vision_tower.", "model.vae_connector.")
# our own layout stores the decoder configs next to the weights (the release reads them from the hub)
SANA_CONFIG_DIR, VAE_CONFIG_DIR = "sana", "sana_vae"


def _resolve_checkpoint(name_or_path: str) -> Path:
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; give the checkpoint folder or a hub id")
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.txt", "*.jinja", "*.model", "*.tiktoken", f"{SANA_CONFIG_DIR}/*",
            f"{VAE_CONFIG_DIR}/*"]))
    except Exception as error:  # noqa: BLE001 - any hub/network failure gets the same actionable message
        raise OSError(f"cannot find BLIP3o-NEXT checkpoint {name_or_path!r}: not a local folder, and the hub "
                      f"download failed ({type(error).__name__}: {error}). Download it where the hub is "
                      "reachable and pass the local folder as model_name_or_path.") from error


# Weight files, in the order they are looked for: (single file, sharded index). Checkpoints whose connectors share a
# norm can only be saved as torch .bin files, so those are read too (tensors only: weights_only).
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_state_dict(folder: Path) -> dict[str, Tensor]:
    for single, index_name in WEIGHT_FILES:
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: shard(s) {missing} listed in {index_name} are missing")
            state = {}
            for shard in shards:
                state.update(_load_weight_file(folder / shard))
            return state
        if (folder / single).is_file():
            return _load_weight_file(folder / single)
    raise FileNotFoundError(f"{folder}: no weights ({', '.join(name for pair in WEIGHT_FILES for name in pair)})")


def _decoder_configs(folder: Path, diffusion_name_or_path: str) -> tuple[dict, dict]:
    """Sana and DC-AE configs: from our layout's subfolders, else from the Sana repo as the release does."""
    if (folder / SANA_CONFIG_DIR / "config.json").is_file() and (folder / VAE_CONFIG_DIR / "config.json").is_file():
        return (SanaTransformer2DModel.load_config(str(folder / SANA_CONFIG_DIR)),
                AutoencoderDC.load_config(str(folder / VAE_CONFIG_DIR)))
    try:
        return (SanaTransformer2DModel.load_config(diffusion_name_or_path, subfolder="transformer"),
                AutoencoderDC.load_config(diffusion_name_or_path, subfolder="vae"))
    except Exception as error:  # noqa: BLE001
        raise OSError(f"cannot read the Sana/DC-AE configs ({diffusion_name_or_path!r}, subfolders 'transformer/' "
                      f"and 'vae/', named by the checkpoint's diffusion_name_or_path): {type(error).__name__}: "
                      f"{error}. Only their config.json files are needed (the weights are in the BLIP3o checkpoint):"
                      " pass diffusion_name_or_path=LOCAL_COPY, or put them in the checkpoint folder as "
                      f"'{SANA_CONFIG_DIR}/config.json' and '{VAE_CONFIG_DIR}/config.json'.") from error


def _load_into(module: nn.Module, state: dict[str, Tensor], what: str, allow_missing: tuple[str, ...] = ()) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in allow_missing]
    if missing:
        raise KeyError(f"checkpoint is missing {len(missing)} {what} weight(s), e.g. {missing[:5]}")
    if result.unexpected_keys:
        raise KeyError(f"checkpoint has {len(result.unexpected_keys)} {what} weight(s) the model does not know, "
                       f"e.g. {result.unexpected_keys[:5]}")


def load_blip3o_next(model_name_or_path: str, diffusion_name_or_path: str | None = None) -> dict:
    """The policy's parts from a release checkpoint (or our save_pretrained output): Qwen3 backbone, connector, Sana
    and DC-AE from one state dict, the tokenizer, the release ids, and the `blip3o_*` settings our layout adds."""
    folder = _resolve_checkpoint(model_name_or_path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    raw = json.loads(config_path.read_text())
    missing = [k for k in RELEASE_ID_FIELDS if k not in raw]
    if missing:
        raise KeyError(f"{config_path} lacks the BLIP3o-NEXT field(s) {missing}; is this a BLIP3o-NEXT checkpoint?")
    ids = {k: int(raw[k]) for k in RELEASE_ID_FIELDS}
    diffusion = diffusion_name_or_path or raw.get("diffusion_name_or_path") or DEFAULT_DIFFUSION_REPO

    # The release's model_type ("blip3o_qwen*") is registered only by its own package; the backbone is Qwen3.
    qwen_fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map",
                                                              "transformers_version")}
    if qwen_fields.get("rope_scaling", 0) is None:  # the release writes rope_scaling = None
        del qwen_fields["rope_scaling"]
    sana_config, vae_config = _decoder_configs(folder, diffusion)
    # Parameters on the meta device (buffers stay real): no random init of ~4B parameters that the checkpoint
    # overwrites; load_state_dict(assign=True) puts the checkpoint tensors in, and a parameter it lacks fails loudly.
    with init_empty_weights(include_buffers=False):
        backbone = Qwen3ForCausalLM(Qwen3Config(**qwen_fields))
        sana = SanaTransformer2DModel.from_config(sana_config)
        vae = AutoencoderDC.from_config(vae_config)
        connector = build_connector(backbone.config.hidden_size, sana.config.caption_channels)

    state = _load_state_dict(folder)
    parts: dict[str, dict[str, Tensor]] = {"sana": {}, "vae": {}, "connector": {}, "backbone": {}}
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        for prefix, part in ((VAE_PREFIX, "vae"), (SANA_PREFIX, "sana"), (CONNECTOR_PREFIX, "connector")):
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            parts["backbone"][key] = value
    tied = bool(getattr(backbone.config, "tie_word_embeddings", False))
    _load_into(backbone, parts["backbone"], "Qwen3 backbone", allow_missing=("lm_head.weight",) if tied else ())
    if "lm_head.weight" not in parts["backbone"] and not tied:
        raise KeyError("checkpoint has no lm_head.weight and the config does not tie word embeddings")
    if tied:
        backbone.tie_weights()
    _load_into(sana, parts["sana"], f"Sana transformer ({SANA_PREFIX}*)")
    _load_into(vae, parts["vae"], f"DC-AE ({VAE_PREFIX}*)")
    _load_into(connector, parts["connector"], f"diffusion connector ({CONNECTOR_PREFIX}*)")
    for what, module in (("backbone", backbone), ("Sana", sana), ("DC-AE", vae), ("connector", connector)):
        empty = [n for n, p in module.named_parameters() if p.is_meta]
        if empty:
            raise KeyError(f"checkpoint left {len(empty)} {what} parameter(s) unset, e.g. {empty[:5]}")

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001
        raise OSError(f"cannot load the tokenizer from {folder}: {type(error).__name__}: {error}") from error
    for field, token in (("image_start_tag_id", "<im_start>"), ("scale_start_token_id", "<S0>"),
                         ("image_start_token_id", "<I0>")):
        if tokenizer.convert_tokens_to_ids(token) != ids[field]:
            raise ValueError(f"config {field}={ids[field]} but the tokenizer maps {token} to "
                             f"{tokenizer.convert_tokens_to_ids(token)}")
    return dict(model=backbone, tokenizer=tokenizer, decoder=DiffusionDecoder(connector, sana, vae), ids=ids,
                diffusion_name_or_path=diffusion, release_config={k: raw[k] for k in ("mm_vision_tower",) if k in raw},
                saved={k[len("blip3o_"):]: v for k, v in raw.items() if k.startswith("blip3o_")})
