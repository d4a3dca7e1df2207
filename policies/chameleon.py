"""Chameleon / Anole on transformers' `ChameleonForConditionalGeneration`, plus the VQGAN decoder transformers lacks.

Release facts the code relies on (../shared/notes/models.md §3, §9):
- Image tokens are BPE ids named `IMGIMG<digits spelled A-J>Z` (8192 codes, ids 4..8195 in the release); the codebook
  index comes from the name (`model.model.vocabulary_mapping.bpe2img`), never from `id - 4`. BOI is `<racm3:break>`,
  EOI `<eoss>`; Anole's text-to-image prompt is `[BOS] text <reserved08706>` (END-OF-TURN), then BOI, then exactly
  grid*grid = 1024 image tokens (32x32, 512 px), then EOI.
- `ChameleonForConditionalGeneration.forward` sets every image-token logit to finfo.min. We therefore run the decoder
  stack (`model.model`) and apply the *image rows* of `lm_head` to the hidden states ourselves, so no
  full-vocabulary logits are ever built at image positions (`image_logits`).
- transformers has the VQ *encoder* only. `VQGANDecoder` is the taming-transformers decoder of Chameleon's image
  tokenizer (conv_in, mid block with attention, up levels of num_res_blocks+1 resnet blocks with nearest x2 + conv
  upsampling, GroupNorm-swish-conv_out), driven by the same `vq_config` as the encoder. It reuses transformers'
  Chameleon VQ quantizer (codebook embedding), resnet and attention blocks, whose shapes and parameter names match
  the release. Its weights come from the release's `tokenizer/vqgan.ckpt` (Lightning: `{"state_dict": ...}`).
- Key mapping (release key -> our module): identical names for everything the decoder needs --
  `quantize.embedding.weight`, `post_quant_conv.*`, `decoder.{conv_in,mid.*,up.<i>.block.<j>.*,up.<i>.attn.<j>.*,
  up.<i>.upsample.conv.*,norm_out,conv_out}.*`; keys under `encoder.`, `quant_conv.` and `loss.` (encoder and
  training losses) are not needed for decoding and are skipped. Any other key, a missing key or a shape mismatch is
  an error that names it (`load_vqgan_decoder`).
- Weights: `facebook/chameleon-7b` was released with image generation disabled (its image-token rows of the output
  layer cannot draw). The default is Anole (`GAIR/Anole-7b-v0.1`, which retrained only those rows):
  `ANOLE_HF_ID` is its transformers conversion (made with the converter of transformers PR #32013; the decoder keys
  it also carries are unknown to upstream transformers and are ignored on load), and the decoder comes from the
  original release's `tokenizer/vqgan.ckpt` (`ANOLE_VQGAN`, Chameleon's VQGAN unchanged). To convert the original
  Meta-layout release yourself, run transformers' converter from its source tree (not shipped in the wheel):
  `python src/transformers/models/chameleon/convert_chameleon_weights_to_hf.py --input_dir <GAIR/Anole-7b-v0.1
  download> --model_size 7B --output_dir <dir>`, copy `tokenizer/vqgan.ckpt` into <dir>, and pass
  `model_name_or_path=<dir>` (the converter drops decoder keys, which is why the decoder has its own file).
- CFG as released (§9.3) mixes three contexts, l = u + s_img (i - u) + s_txt (f - i), with image-only context i
  (BOS, BOI, EOI and image tokens only) and unconditional u = [BOS, BOI]. For a text-only prompt i == u, so the
  release reduces *exactly* to l = u + s (f - u) with s = s_txt (3.0): that is what we sample and score. The
  unconditional stream is the conditional sequence with every text token masked out of attention (positions from
  the mask), which is [BOS, BOI, image tokens so far] -- the release's context, padding excluded from attention.
- Anole samples images at temperature 0.7 with top-p 0.9 (`release_sampling`); the family default for RL is
  temperature 1 without top-p (`default_sampling`; see SamplingSettings for why truncation is off).

Two modes:
- `mode="t2i"` (default, for text-to-image RL): BOI is forced after the prompt; the completion is the grid*grid image
  tokens, every one an action.
- `mode="interleaved"`: the prompt is `[BOS] text <reserved08706>` and the policy writes text, may choose BOI (an
  action), then exactly grid*grid image tokens (actions, restricted to image codes), then EOI (forced, action_mask
  False), then text again until EOS or the end. The rollout is a fixed [N, T] with
  T = text_tokens + grid*grid + 2; after EOS the row is padding (`extras["completion_mask"]` 0, action_mask False).
  BOI may be chosen only while no image was opened and the image still fits (T - t >= grid*grid + 2). Text steps
  may write only what the release's text decoder allows: EOS, BOI and text tokens, never image tokens or special
  ones (names starting with "<": EOI, pad, BOS, END-OF-TURN, the reserved tokens). Text tokens are sampled from
  the conditional logits (no CFG, same temperature and top-k/top-p) -- a simplification: the release uses a
  repetition penalty for text, which would make the scored distribution depend on more than the prefix. A row that
  never opened an image decodes to a blank mid-grey image (`image.info["no_image"] = True`), counted in
  `last_decode_missing` and logged; the reward scores that blank image like any other, so opening no image is a
  choice with a consequence, not a masked-out sample.

Think-then-draw (policies/plan.py), `mode="t2i"` only:
- The plan-writing prompt is the t2i prompt without its BOI, `[BOS] request <reserved08706>`: the plan is the model's
  text turn after the user's (the layout interleaved mode samples too). It is written with the full `lm_head` on the
  decoder stack's hidden states (`text_logits`, the same path in sampling and scoring; transformers' forward would
  put the image rows at finfo.min, we ban them instead). A plan may write what interleaved text steps may: not the
  8192 image codes nor any special token (EOI, pad, BOS, `<image>`, the reserved tokens; `plan_banned_ids`); it
  stops at EOS (the default end marker), at BOI, or after `max_tokens`.
- The image follows `[BOS] request <reserved08706> plan <racm3:break>` (`image_prefix_ids = [BOI]`, the end marker
  and padding masked out; a plan that chose BOI itself has no second one). Nothing goes between plan and BOI: that
  is how Anole's interleaved outputs open an image after text, and an END-OF-TURN there would claim a turn boundary
  the model never wrote.
- CFG: the plan is text, so the release's unconditional row masks it out with the prompt: it stays
  [BOS, BOI, image tokens so far] whatever the plan (banning BOS from plans keeps it so). Sampling prefills one
  context per sample (prompt + its plan + BOI, masked holes, positions from the mask) and scoring runs the same
  contexts teacher-forced, so both see the same sequences. Without a plan the group still shares one prefill.
- Interleaved mode refuses a plan (`set_plan` raises): there the policy already writes text before it chooses BOI.

Deliberate difference from the release: positions come from the attention mask (`cumsum - 1`) in sampling and
scoring, so left padding does not shift a prompt and its samples do not depend on the batch.
"""

from __future__ import annotations

import logging
import os

import torch
from PIL import Image
from torch import Tensor, nn
from trl.trainer.utils import selective_log_softmax

from policies import tiny as toy
from policies.base import (ImageSample, Policy, Rollout, SamplingSettings, entropy_of_logits, kept_counts,
                           position_ids_from_mask, process_logits, sample_from_logits)
from policies.checkpoints.vqgan import (VQGAN_FILENAME, default_vqgan_path, load_vqgan_decoder,
                                       save_vqgan_decoder)
from policies.modules.vqgan import VQGANDecoder

log = logging.getLogger("grpo_img")

ANOLE_HF_ID = "leloy/Anole-7b-v0.1-hf"
BOI_TOKEN, EOI_TOKEN, EOT_TOKEN = "<racm3:break>", "<eoss>", "<reserved08706>"
MODES = ("t2i", "interleaved")
# The tiny decoder (one resnet block per level) fits the demo palette to an MSE of about 0.01 in this many steps.
TINY_PALETTE_FIT_STEPS = 300
TINY_CODES = 256  # the tiny model's codebook: 64 image tokens (8x8 grid), 32 px images

# ----------------------------------------------------------------------------------------------------------------
# The policy


class ChameleonPolicy(Policy):
    name = "chameleon"
    # Language model only: the decoder layers' projections (the VQ encoder has no *_proj Linear layers, and the
    # VQGAN decoder lives outside `model`).
    lora_target_modules = (r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                           r"|mlp\.(gate_proj|up_proj|down_proj))")
    # The output layer holds the image head (its image rows; Anole retrained exactly those). Only rows that are
    # scored receive gradients.
    modules_to_save = ["lm_head"]
    # Anole's CFG scale 3.0 (text-to-image: the release's three-way CFG reduces to one scale, module docstring).
    # Anole samples images at temperature 0.7 with top-p 0.9 (GAIR-NLP/anole `Options.Image`); RL here samples the
    # untruncated distribution at temperature 1, so that no code the updated policy may want has a -inf log-prob.
    default_sampling = SamplingSettings(cfg_scale=3.0, temperature=1.0)
    release_sampling = SamplingSettings(cfg_scale=3.0, temperature=0.7, top_p=0.9)

    def __init__(self, model, tokenizer, decoder: VQGANDecoder, mode: str = "t2i", text_tokens: int = 32,
                 decode_batch_size: int = 8):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if text_tokens < 1:
            raise ValueError(f"text_tokens must be >= 1, got {text_tokens}")
        self.model, self.tokenizer, self.decoder = model, tokenizer, decoder
        self.mode, self.text_tokens, self.decode_batch_size = mode, text_tokens, decode_batch_size
        tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        missing = [t for t in (BOI_TOKEN, EOI_TOKEN, EOT_TOKEN) if t not in vocab]
        if missing or None in (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
            raise ValueError(f"Chameleon tokenizer must define BOS, EOS, pad and {BOI_TOKEN}, {EOI_TOKEN}, "
                             f"{EOT_TOKEN}; missing {missing}")
        self.bos_id, self.pad_id, self.eos_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
        self.boi_id, self.eoi_id, self.eot_id = vocab[BOI_TOKEN], vocab[EOI_TOKEN], vocab[EOT_TOKEN]
        mapping = model.model.vocabulary_mapping
        image_ids = torch.tensor(mapping.image_tokens, dtype=torch.long)  # sorted BPE ids
        codes = torch.tensor([mapping.bpe2img[i] for i in mapping.image_tokens], dtype=torch.long)
        num_codes = decoder.config.num_embeddings
        if len(image_ids) != num_codes or sorted(codes.tolist()) != list(range(num_codes)):
            raise ValueError(f"the vocabulary has {len(image_ids)} IMGIMG tokens, the VQGAN {num_codes} codes")
        vocab_size = model.config.vocab_size
        self._image_ids = image_ids  # column j of the image head is BPE id image_ids[j]
        # contiguous ids (the release's IMGIMG block is): the head's image rows are a view, not a gather per step
        first = int(image_ids[0])
        contiguous = torch.equal(image_ids, torch.arange(first, first + len(image_ids)))
        self._image_rows = slice(first, first + len(image_ids)) if contiguous else None
        self._bpe_to_code = torch.full((vocab_size,), -1, dtype=torch.long).index_put_((image_ids,), codes)
        self._is_image = torch.zeros(vocab_size, dtype=torch.bool).index_fill_(0, image_ids, True)
        # Text steps may write what the release's text decoder allows (chameleon/inference/chameleon.py,
        # TextDecoder._allowed_tokens): EOS, BOI and the text tokens, i.e. every token but the IMGIMG image tokens
        # and the special ones, whose names start with "<" (vocab.py; "<" itself is text). That bans EOI, pad, BOS,
        # END-OF-TURN and every <reservedNNNNN>. BOI is further limited to where an image may still open.
        special = [i for name, i in vocab.items() if name.startswith("<") and name != "<"]
        self._text_banned = self._is_image.clone()
        self._text_banned[special] = True
        self._text_banned[[self.eos_id, self.boi_id]] = False
        # a plan writes what interleaved text steps may write (BOS stays banned: the unconditional CFG row keeps
        # every BOS, so a written one would leak into it; so does the processor's <image> placeholder)
        self._plan_banned = self._text_banned.nonzero().flatten().tolist()
        self.grid = decoder.grid
        self.image_size = decoder.config.resolution
        image_tokens = self.grid * self.grid
        # the image span of the rollout; in interleaved mode it also holds the text around the image
        self.num_image_tokens = image_tokens if mode == "t2i" else text_tokens + image_tokens + 2
        self.last_decode_missing = 0

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model_name_or_path: str | None = None, tiny: bool = False, dtype: str = "float32", *,
              mode: str = "t2i", text_tokens: int = 32, vqgan_path: str | None = None, decode_batch_size: int = 8,
              tiny_palette: list[str] | None = None, seed: int = 0) -> "ChameleonPolicy":
        """Real weights by hub id or local path (default hub id: `ANOLE_HF_ID`), or (`tiny=True`) the same
        architecture with random weights.

        `vqgan_path`: the release's `vqgan.ckpt`. Default: `<model dir>/vqgan.ckpt` for a local directory (what
        `save_pretrained` writes), else the Anole release's `tokenizer/vqgan.ckpt` from the hub.
        `mode`: "t2i" (BOI forced after the prompt) or "interleaved" (text, optional BOI, image, text; `text_tokens`
        text tokens in all). `tiny_palette` (tiny only): fit the random decoder so that code k paints
        `tiny_palette[k % len]` (the demo's toy world; see policies/tiny.py).
        """
        from transformers import AutoTokenizer, ChameleonForConditionalGeneration

        torch_dtype = getattr(torch, dtype)
        if tiny:
            torch.manual_seed(seed)
            model, tokenizer = toy.tiny_chameleon(
                [BOI_TOKEN, EOI_TOKEN, EOT_TOKEN, "<image>"], [_image_token_name(k) for k in range(TINY_CODES)],
                extra_special={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": "<image>"})
            decoder = VQGANDecoder(model.config.vq_config)
            if vqgan_path is not None:
                load_vqgan_decoder(decoder, vqgan_path)
            elif tiny_palette:
                toy.fit_decoder_to_palette(decoder, decoder.parameters(), decoder.config.num_embeddings, decoder.grid,
                                       tiny_palette, steps=TINY_PALETTE_FIT_STEPS, seed=seed)
            model.to(torch_dtype)
        else:
            model = ChameleonForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            decoder = VQGANDecoder(model.config.vq_config)
            load_vqgan_decoder(decoder, vqgan_path or default_vqgan_path(model_name_or_path))
        policy = cls(model, tokenizer, decoder, mode=mode, text_tokens=text_tokens,
                     decode_batch_size=decode_batch_size)
        return policy

    def save_pretrained(self, path: str) -> None:
        """LM + tokenizer (transformers layout) and the decoder as `vqgan.ckpt` in the release's layout."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_vqgan_decoder(self.decoder, os.path.join(path, VQGAN_FILENAME))

    def modules(self) -> list[nn.Module]:
        return [self.model, self.decoder]

    def to(self, device: torch.device | str) -> "ChameleonPolicy":
        super().to(device)
        # the vocabulary lookups follow, so sampling does not copy them every step
        for name in ("_image_ids", "_bpe_to_code", "_is_image", "_text_banned"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- prompts ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """`[BOS] text <reserved08706>` (+ BOI in t2i mode), left-padded. Special ids are appended as ids, not
        spelled in text, so no tokenizer can split them."""
        return self._encode(prompts, [self.eot_id] + ([self.boi_id] if self.mode == "t2i" else []))

    def _encode(self, texts: list[str], tail: list[int]) -> tuple[Tensor, Tensor]:
        """`[BOS] text` + `tail` ids per row, left-padded."""
        if not texts:
            raise ValueError("no prompts given")
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
            rows.append(ids + tail)
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    # -- think-then-draw hooks (policies/plan.py): the plan is the model's text turn after the prompt's turn -----

    @property
    def plan_refusal(self) -> str | None:
        """t2i mode only: in interleaved mode the policy already writes text before it opens the image."""
        if self.mode == "t2i":
            return None
        return ("think-then-draw (`plan: true`) needs mode='t2i'; in mode='interleaved' the policy already writes "
                "text before it opens the image, which is its own plan")

    @property
    def plan_tokenizer(self):
        return self.tokenizer

    def plan_prompt_text(self, request: str) -> str:
        """`request<reserved08706>` (the tokenizer adds BOS). Shown for reference: `encode_plan_prompts` appends the
        end-of-turn token as an id, as `encode_prompts` does."""
        return request + EOT_TOKEN

    def encode_plan_requests(self, requests: list[str]) -> tuple[Tensor, Tensor]:
        """`[BOS] request <reserved08706>`: the t2i prompt without its BOI, so the plan is the next turn."""
        return self._encode(requests, [self.eot_id])

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        """Full-vocabulary `lm_head` logits on the decoder stack's hidden states (image rows included, unlike
        transformers' forward; the plan's banned ids are set to -inf by the plan machinery, in sampling and
        scoring alike)."""
        return self.model.lm_head(self.hidden_states(ids, mask, positions, cache))

    @property
    def image_prefix_ids(self) -> list[int]:
        return [self.boi_id]

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
        """What interleaved text steps may not write: the image codes and every special token (EOI, pad, BOS --
        the unconditional CFG row keeps every BOS, so a written one would leak into it --, `<image>`, the reserved
        tokens), except a special end marker the config chose. BOI is allowed: it ends the plan."""
        return [i for i in self._plan_banned if i != end_marker_id]

    def unconditional_mask(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The release's unconditional context as an attention mask over the same sequence: BOS, BOI, EOI and image
        tokens only ([BOS, BOI, image so far] for a text prompt)."""
        keep = (ids == self.bos_id) | (ids == self.boi_id) | (ids == self.eoi_id) | self._is_image.to(ids.device)[ids]
        return mask * keep.long()

    # -- heads --------------------------------------------------------------------------------------------------

    def image_logits(self, hidden: Tensor) -> Tensor:
        """Logits over the image codes only (column j = BPE id `_image_ids[j]`): the image rows of `lm_head`
        applied to the hidden states, never the full vocabulary."""
        weight = self.model.lm_head.weight  # peft's modules_to_save wrapper resolves this to the active copy
        rows = self._image_rows if self._image_rows is not None else self._image_ids.to(weight.device)
        return nn.functional.linear(hidden, weight[rows])

    def _text_step_logits(self, hidden: Tensor, boi_allowed: Tensor) -> Tensor:
        """Interleaved mode: full-vocabulary logits for text steps, with image tokens, EOI, pad (and BOI where not
        allowed) at -inf."""
        logits = self.model.lm_head(hidden).float()
        banned = self._text_banned.to(logits.device).expand_as(logits).clone()
        banned[:, self.boi_id] = ~boi_allowed
        return logits.masked_fill(banned, float("-inf"))

    def _boi_allowed(self, t: int | Tensor, opened_before: Tensor) -> Tensor:
        """BOI is a choice only while no image was opened and the whole image plus EOI still fits."""
        fits = (self.num_image_tokens - t) >= self.grid * self.grid + 2
        return ~opened_before & fits

    @property
    def decoder_stack(self) -> nn.Module:
        return self.model.model

    def image_token_ids(self, index: Tensor) -> Tensor:
        return self._image_ids.to(index.device)[index]

    def image_choice_index(self, token_ids: Tensor) -> Tensor:
        return torch.searchsorted(self._image_ids.to(token_ids.device), token_ids)

    def guidance_rows(self, ids: Tensor, mask: Tensor, guided: bool) -> tuple[Tensor, Tensor]:
        """The unconditional rows are the same sequence with the text masked out (`unconditional_mask`)."""
        if not guided:
            return ids, mask
        return torch.cat([ids, ids]), torch.cat([mask, self.unconditional_mask(ids, mask)])

    # -- interleaved mode: text, a chosen BOI, the image, text ------------------------------------------------
    # t2i mode runs on the engine (policies/base.py) unchanged. Interleaved mode has a per-row state (text, inside
    # the image, forced EOI, finished) that the engine's fixed layout cannot express, so it has its own loop on the
    # engine's pieces (the same streams, CachedDecoder, process_logits and image head).

    def sample_image(self, ids: Tensor, mask: Tensor, repeats: int, settings: SamplingSettings,
                     generator: torch.Generator | None) -> ImageSample:
        if self.mode == "t2i":
            return super().sample_image(ids, mask, repeats, settings, generator)
        text_settings = SamplingSettings(1.0, settings.temperature, settings.top_k, settings.top_p, settings.min_p)
        n, steps, device = ids.shape[0] * repeats, self.num_image_tokens, self.device
        image_len = self.grid * self.grid
        cfg = settings.uses_cfg
        # Prefill each context once (conditional and unconditional rows), then share the cache across its repeats.
        (stream,) = self.image_streams(ids, mask, repeats, cfg)
        decoder = self.start_decoder(stream, steps - 1)

        tokens = torch.full((n, steps), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(n, steps, dtype=torch.float32, device=device)
        kept = torch.zeros(n, steps, dtype=torch.int32, device=device)
        completion_mask = torch.zeros(n, steps, dtype=torch.long, device=device)
        in_image = torch.zeros(n, dtype=torch.bool, device=device)  # inside an image span
        image_count = torch.zeros(n, dtype=torch.long, device=device)
        opened = torch.zeros(n, dtype=torch.bool, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(steps):
            hidden = decoder.last
            cond = hidden[:n]
            step_tokens = torch.full((n,), self.pad_id, dtype=torch.long, device=device)
            step_lp = torch.zeros(n, dtype=torch.float32, device=device)
            step_kept = torch.zeros(n, dtype=torch.int32, device=device)
            image_rows = in_image & (image_count < image_len)
            eoi_rows = in_image & (image_count == image_len)
            text_rows = ~in_image & ~done
            if image_rows.any():
                uncond = self.image_logits(hidden[n:][image_rows]) if cfg else None
                processed = process_logits(self.image_logits(cond[image_rows]), uncond, settings)
                code, lp = sample_from_logits(processed, generator)
                step_tokens[image_rows], step_lp[image_rows] = self.image_token_ids(code), lp
                step_kept[image_rows] = kept_counts(processed)
            if text_rows.any():
                allowed = self._boi_allowed(t, opened[text_rows])
                processed = process_logits(self._text_step_logits(cond[text_rows], allowed), None, text_settings)
                step_tokens[text_rows], step_lp[text_rows] = sample_from_logits(processed, generator)
                step_kept[text_rows] = kept_counts(processed)
            step_tokens[eoi_rows] = self.eoi_id  # forced, log-prob 0
            attended = ~done
            tokens[:, t], logprobs[:, t], completion_mask[:, t] = step_tokens, step_lp, attended.long()
            kept[:, t] = step_kept

            # bookkeeping of the row states
            image_count = image_count + image_rows.long()
            in_image = (in_image & ~eoi_rows) | (text_rows & (step_tokens == self.boi_id))
            opened = opened | in_image
            done = done | (text_rows & (step_tokens == self.eos_id))
            if t + 1 == steps:
                break
            feed = step_tokens[:, None]
            new_mask = attended.long()[:, None]
            if cfg:
                feed = torch.cat([feed, feed])
                new_mask = torch.cat([new_mask, self.unconditional_mask(step_tokens[:, None], new_mask)])
            decoder.step(feed, new_mask[:, 0])
        free = completion_mask.bool() & (tokens != self.eoi_id)
        return ImageSample(tokens, free, logprobs, {"completion_mask": completion_mask},
                           kept=kept if settings.truncates else None)

    def score_image(self, rollout: Rollout, context_ids: Tensor, context_mask: Tensor, guided: bool,
                    return_entropy: bool, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.mode == "t2i":
            return super().score_image(rollout, context_ids, context_mask, guided, return_entropy, entropy_grad)
        settings = rollout.sampling
        text_settings = SamplingSettings(1.0, settings.temperature, settings.top_k, settings.top_p, settings.min_p)
        completion = rollout.image_ids
        n, steps = completion.shape
        completion_mask = rollout.extras["completion_mask"]
        seq = torch.cat([context_ids, completion[:, :-1]], dim=1)
        cond_mask = torch.cat([context_mask, completion_mask[:, :-1].long()], dim=1)
        start = context_ids.shape[1] - 1  # hidden state at start + t predicts completion token t
        hidden = self.hidden_states(seq, cond_mask, position_ids_from_mask(cond_mask))[:, start:]

        is_image = self._is_image.to(completion.device)[completion] & completion_mask.bool()
        is_text = rollout.action_mask[:, rollout.num_plan_tokens:] & ~is_image
        kept = rollout.kept[:, rollout.num_plan_tokens:] if rollout.kept is not None and settings.truncates else None
        logprobs = torch.zeros(n, steps, dtype=torch.float32, device=completion.device)
        entropy = torch.zeros_like(logprobs)
        if is_image.any():
            uncond = None
            if guided:
                uncond_mask = self.unconditional_mask(seq, cond_mask)
                hidden_u = self.hidden_states(seq, uncond_mask, position_ids_from_mask(uncond_mask))[:, start:]
                uncond = self.image_logits(hidden_u[is_image])
            processed = process_logits(self.image_logits(hidden[is_image]), uncond, settings,
                                       kept[is_image] if kept is not None else None)
            codes = self.image_choice_index(completion[is_image])
            logprobs = logprobs.index_put((is_image.nonzero(as_tuple=True)), selective_log_softmax(processed, codes))
            if return_entropy:
                entropy[is_image] = entropy_of_logits(processed if entropy_grad else processed.detach())
        if is_text.any():
            is_boi = (completion == self.boi_id).long()
            opened_before = (torch.cumsum(is_boi, 1) - is_boi) > 0  # a BOI strictly before this step
            step = torch.arange(steps, device=completion.device).expand(n, steps)
            allowed = self._boi_allowed(step[is_text], opened_before[is_text])
            processed = process_logits(self._text_step_logits(hidden[is_text], allowed), None, text_settings,
                                       kept[is_text] if kept is not None else None)
            logprobs = logprobs.index_put((is_text.nonzero(as_tuple=True)),
                                          selective_log_softmax(processed, completion[is_text]))
            if return_entropy:
                entropy[is_text] = entropy_of_logits(processed if entropy_grad else processed.detach())
        return logprobs, entropy if return_entropy else None

    # -- pixels -------------------------------------------------------------------------------------------------

    def image_codes(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Codebook indices [N, grid*grid] of each row's image span, and a bool [N]: did the row open an image."""
        completion = rollout.image_ids
        image_len = self.grid * self.grid
        n = completion.shape[0]
        codes = torch.zeros(n, image_len, dtype=torch.long, device=completion.device)
        has_image = torch.zeros(n, dtype=torch.bool, device=completion.device)
        bpe_to_code = self._bpe_to_code.to(completion.device)
        for row in range(n):
            if self.mode == "t2i":
                span, start = completion[row], 0
            else:
                boi = (completion[row] == self.boi_id).nonzero()
                if len(boi) == 0:
                    continue
                start = int(boi[0]) + 1
                span = completion[row, start:start + image_len]
            row_codes = bpe_to_code[span]
            if len(span) != image_len or (row_codes < 0).any():
                raise ValueError(f"row {row}: the image span starting at {start} is not {image_len} image tokens")
            codes[row], has_image[row] = row_codes, True
        return codes, has_image

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        codes, has_image = self.image_codes(rollout)
        self.last_decode_missing = int((~has_image).sum())
        if self.last_decode_missing:
            log.info("chameleon: %d of %d samples opened no image; they get a blank grey image",
                     self.last_decode_missing, len(has_image))
        images: list[Image.Image] = []
        decoder_device = next(self.decoder.parameters()).device
        for chunk, present in zip(codes.split(self.decode_batch_size), has_image.split(self.decode_batch_size)):
            pixels = torch.zeros(len(chunk), self.image_size, self.image_size, 3, dtype=torch.uint8)
            if present.any():
                decoded = self.decoder(chunk[present].to(decoder_device)).float().clamp(-1, 1)
                # as released: (x + 1) / 2 * 255, truncated to uint8
                pixels[present.cpu()] = ((decoded + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).cpu()
            pixels[~present.cpu()] = 127
            for p, ok in zip(pixels.numpy(), present.tolist()):
                image = Image.fromarray(p)
                if not ok:
                    image.info["no_image"] = True
                images.append(image)
        return images


def _image_token_name(code: int) -> str:
    """The release's name of codebook entry `code`: IMGIMG + its decimal digits spelled A-J + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


