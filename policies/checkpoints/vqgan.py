"""Chameleon's release VQGAN checkpoint (`tokenizer/vqgan.ckpt`, Lightning `{"state_dict": ...}`) <-> `VQGANDecoder`.

Key mapping (release key -> our module): identical names for everything the decoder needs --
`quantize.embedding.weight`, `post_quant_conv.*`, `decoder.{conv_in,mid.*,up.<i>.block.<j>.*,up.<i>.attn.<j>.*,
up.<i>.upsample.conv.*,norm_out,conv_out}.*`; keys under `encoder.`, `quant_conv.` and `loss.` (encoder and training
losses) are not needed for decoding and are skipped. Any other key, a missing key or a shape mismatch is an error
that names it.
"""

from __future__ import annotations

import os

import torch
from huggingface_hub import hf_hub_download

from policies.modules.vqgan import VQGANDecoder

ANOLE_VQGAN = ("GAIR/Anole-7b-v0.1", "tokenizer/vqgan.ckpt")
VQGAN_FILENAME = "vqgan.ckpt"

# Release-checkpoint keys that decoding does not need (the encoder side and the training losses).
SKIPPED_RELEASE_PREFIXES = ("encoder.", "quant_conv.", "loss.")


def release_key_to_module_key(key: str) -> str | None:
    """The documented mapping from a `vqgan.ckpt` state-dict key to a `VQGANDecoder` key (None: not needed)."""
    if key.startswith(SKIPPED_RELEASE_PREFIXES):
        return None
    return key  # decoder.*, post_quant_conv.*, quantize.embedding.weight keep their release names


def save_vqgan_decoder(decoder: VQGANDecoder, path: str) -> None:
    """Write the decoder in the release's layout (a Lightning-style `{"state_dict": ...}`), loadable by the release
    code and by `load_vqgan_decoder`."""
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    torch.save({"state_dict": state}, path)


def load_vqgan_decoder(decoder: VQGANDecoder, path: str) -> VQGANDecoder:
    """Load `vqgan.ckpt` (release layout) into `decoder`; missing, unexpected or mis-shaped keys raise, by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    # weights_only: the release file loads this way (transformers' converter reads it so), and nothing else runs
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw["state_dict"] if isinstance(raw, dict) and "state_dict" in raw else raw
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict (got {type(state).__name__})")
    expected = decoder.state_dict()
    mapped, unexpected = {}, []
    for key, value in state.items():
        target = release_key_to_module_key(key)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ValueError(f"{path}: key {key!r} has shape {tuple(value.shape)}, the decoder built from vq_config "
                             f"expects {tuple(expected[target].shape)}")
        mapped[target] = value
    missing = sorted(set(expected) - set(mapped))
    if missing or unexpected:
        raise KeyError(f"{path} does not match the VQGAN decoder: missing keys {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all); unexpected keys "
                       f"{sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    decoder.load_state_dict(mapped, strict=True)
    return decoder


def default_vqgan_path(model_name_or_path: str) -> str:
    if os.path.isdir(model_name_or_path):
        path = os.path.join(model_name_or_path, VQGAN_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_name_or_path} has no {VQGAN_FILENAME}; copy the release's "
                                    "tokenizer/vqgan.ckpt there or pass vqgan_path=...")
        return path
    return hf_hub_download(ANOLE_VQGAN[0], ANOLE_VQGAN[1])
