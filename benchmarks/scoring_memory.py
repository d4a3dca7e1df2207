"""Peak memory of teacher-forced scoring (forward + backward of the token log-probs) through the output head:
the full text vocabulary, the rows of the image tokens only (the restricted head of families whose image tokens
live in the text vocabulary: Emu3, Chameleon/Anole, BLIP3o-NEXT), and the restricted head in chunks of the
sequence under gradient checkpointing, which never holds [N, T, V] logits.

    python benchmarks/scoring_memory.py                                   # CPU, moderate size
    python benchmarks/scoring_memory.py --rows 2 --tokens 8193 --hidden 4096 --device cuda   # Emu3-Gen on a GPU

Defaults are Emu3-Gen's vocabulary (184622 entries) and codebook (32768 visual tokens) at a moderate hidden size
and length. The head is the only part measured: the transformer below it is the same for the three variants.
Last line: `restricted_over_full_memory=X.XX` (the chunked restricted head over the full head).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import selective_log_softmax

from benchmarks.common import PeakMemory, check_fits, machine_name


def head_logprobs(hidden, weight, targets, chunk: int | None):
    """Log-probs [N, T] of `targets` under softmax(hidden @ weight.T); in chunks of `chunk` positions with
    checkpointing (the chunk's logits are recomputed in backward instead of kept)."""
    if chunk is None:
        return selective_log_softmax(hidden @ weight.T, targets)
    parts = [checkpoint(lambda h, t: selective_log_softmax(h @ weight.T, t), hidden[:, i:i + chunk],
                        targets[:, i:i + chunk], use_reentrant=False)
             for i in range(0, hidden.shape[1], chunk)]
    return torch.cat(parts, dim=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2, help="sequences scored together (N)")
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens per sequence (T)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=184622, help="full vocabulary (Emu3-Gen: 184622)")
    parser.add_argument("--image-vocab", type=int, default=32768, help="image tokens (Emu3 codebook: 32768)")
    parser.add_argument("--chunk", type=int, default=256, help="positions per chunk in the chunked variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    full_logits = args.rows * args.tokens * args.vocab * torch.finfo(dtype).bits // 8
    check_fits(3 * full_logits, str(device), f"full-vocabulary logits of {args.rows}x{args.tokens}x{args.vocab}")
    generator = torch.Generator(device).manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype, generator=generator) * 0.02
    image_rows = torch.arange(args.vocab - args.image_vocab, args.vocab, device=device)  # image ids: one block
    targets = torch.randint(0, args.image_vocab, (args.rows, args.tokens), device=device, generator=generator)
    base = torch.randn(args.rows, args.tokens, args.hidden, device=device, dtype=dtype, generator=generator)

    variants = {
        "full_vocab_head": (weight, targets + image_rows[0], None),
        "image_rows_head": (weight[image_rows].contiguous(), targets, None),
        "image_rows_head_chunked": (weight[image_rows].contiguous(), targets, args.chunk),
    }
    print(f"machine: {machine_name(device)}")
    print(f"rows={args.rows} tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} "
          f"image_vocab={args.image_vocab} chunk={args.chunk} dtype={str(dtype).removeprefix('torch.')}")
    print(f"{'head':<26}{'peak MiB':>10}   (forward + backward of the log-probs; [N,T,V] logits alone: "
          f"{full_logits / 2**20:.0f} MiB full, {full_logits * args.image_vocab / args.vocab / 2**20:.0f} MiB "
          "restricted)")
    peaks, logprobs = {}, {}
    for name, (w, t, chunk) in variants.items():
        hidden = base.clone().requires_grad_(True)
        with PeakMemory(device) as memory:
            lp = head_logprobs(hidden, w, t, chunk)
            lp.sum().backward()
        peaks[name] = memory.peak_bytes
        logprobs[name] = lp.detach().float()
        print(f"{name:<26}{memory.peak_bytes / 2**20:>10.0f}")
        del hidden, lp
    # the chunked path scores exactly what the unchunked restricted head scores
    torch.testing.assert_close(logprobs["image_rows_head_chunked"], logprobs["image_rows_head"])
    ratio = peaks["image_rows_head_chunked"] / max(peaks["full_vocab_head"], 1)
    print(f"image_rows_head / full: {peaks['image_rows_head'] / max(peaks['full_vocab_head'], 1):.2f}")
    print(f"restricted_over_full_memory={ratio:.2f}")
    return {"peaks": peaks, "ratio": ratio}


if __name__ == "__main__":
    main()
