"""Offline stand-ins for tests and the demo: word-level tokenizers and a decoder that can draw colours.

Nothing here replaces a model class: tiny policies are the real transformers architectures with small configs and
random weights. Two things cannot come from a hub offline and are built here instead: a tokenizer, and (for the
demo only) a VQ decoder whose codes render distinct colours. A random decoder renders every code as nearly the same
grey-brown, so a colour reward on its images is nearly constant and there is nothing to learn (see
`../shared/notes/demo.md`); fitting it for a few seconds makes the toy world expressible.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from rewards.color import COLORS

# Words the tiny tokenizers know; anything else maps to <unk>.
TINY_WORDS = (
    "a an the of on in with and image picture photo painting drawing plain colour color solid background "
    "dog cat car tree house apple sign that says text above below left right next to two three four "
    + " ".join(COLORS)
).split()


def word_level_tokenizer(special_tokens: list[str], words: Iterable[str] = TINY_WORDS, bos: str = "<s>",
                         unk: str = "<unk>", pad: str = "<pad>", eos: str = "</s>", extra_special: dict | None = None):
    """A PreTrainedTokenizerFast over a fixed word list that adds BOS, pads on the left and needs no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [pad, bos, eos, unk, *special_tokens, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\d|\*|[.,!?\"]"), "isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        padding_side="left", extra_special_tokens=extra_special or {},
    )
    return tokenizer


def fit_decoder_to_palette(
    decode: Callable[[Tensor], Tensor],
    parameters: Iterable[nn.Parameter],
    num_codes: int,
    grid: int,
    colors: list[str],
    steps: int = 400,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Train a VQ decoder so that code k paints colour `colors[k % len(colors)]` at its own place in the grid.

    `decode(tokens [B, grid*grid]) -> images [B, 3, H, W] in [-1, 1]`. Trained on grids that range from uniformly
    random to one colour only: a decoder fitted on random mosaics alone renders a one-colour grid as grey (its
    GroupNorms see other statistics), so a policy that learns to paint one colour would get no credit. Returns the final mean squared error (pixels in [-1, 1]).
    """
    parameters = list(parameters)
    key = _fit_key(parameters, num_codes, grid, colors, steps, lr, seed)
    if key in _FITTED:  # the same random decoder fitted the same way before in this process: reuse the result
        fitted, loss = _FITTED[key]
        with torch.no_grad():
            for p, value in zip(parameters, fitted):
                p.copy_(value)
        return loss
    generator = torch.Generator().manual_seed(seed)
    palette = torch.tensor([COLORS[c] for c in colors], dtype=torch.float32) / 127.5 - 1.0  # [K, 3]
    code_color = palette[torch.arange(num_codes) % len(colors)]  # [num_codes, 3]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        tokens = _training_grids(8, grid * grid, num_codes, len(colors), generator)
        images = decode(tokens)
        side = images.shape[-1]
        target = code_color[tokens].view(8, grid, grid, 3).permute(0, 3, 1, 2)
        target = nn.functional.interpolate(target, size=(side, side), mode="nearest")
        loss = nn.functional.mse_loss(images, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in parameters:
        p.grad = None
    _FITTED[key] = ([p.detach().clone() for p in parameters], loss.item())
    return loss.item()


# Fitted decoders by (initial weights, fit settings). Tests and notebooks build the same tiny palette policy many
# times in one process; the fit is a deterministic function of these inputs, so it is done once per process.
_FITTED: dict[str, tuple[list[Tensor], float]] = {}


def _fit_key(parameters: list[nn.Parameter], *settings) -> str:
    digest = hashlib.sha1(repr(settings).encode())
    for p in parameters:
        digest.update(str((p.dtype, tuple(p.shape))).encode())
        digest.update(p.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def _training_grids(batch: int, length: int, num_codes: int, num_colors: int, generator: torch.Generator) -> Tensor:
    """Random token grids in which a random fraction (0 to 1) of the tokens are codes of one chosen colour."""
    random_codes = torch.randint(0, num_codes, (batch, length), generator=generator)
    color = torch.randint(0, num_colors, (batch, 1), generator=generator)
    same_color = torch.randint(0, num_codes // num_colors, (batch, length), generator=generator) * num_colors + color
    fraction = torch.rand(batch, 1, generator=generator)
    return torch.where(torch.rand(batch, length, generator=generator) < fraction, same_color, random_codes)
