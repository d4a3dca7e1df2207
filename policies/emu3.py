"""Emu3-Gen (`BAAI/Emu3-Gen-hf`) on transformers' `Emu3ForConditionalGeneration`.

Release facts the code relies on (baaivision/Emu3 `image_generation.py`, transformers `emu3`; notes §2, §9.4):
- Prompt (mode "G", no chat template): BOS + text + `<|image start|>{H}*{W}<|image token|>`, built by
  `Emu3Processor(return_for_image_generation=True, ratio="1:1", image_area=...)`, left-padded. The release appends
  " masterpiece, film grained, best quality." to the user prompt (`prompt_suffix`, on by default).
- Image tokens are BPE ids `<|visual token NNNNNN|>` (32768 codes, contiguous ids) that the text `lm_head` scores
  like any other token. The image span is H rows of W visual tokens, each row closed by EOL `<|extra_200|>`, then
  EOF `<|extra_201|>`, EOI `<|image end|>`, EOS (`<|extra_204|>`): H (W + 1) + 3 tokens. The release enforces this
  with a prefix-constrained logits processor; here the structural tokens are forced the same way: they are not
  sampled, their log-prob is 0 (a point mass) and `action_mask` is False on them, so they never enter the loss.
- Size: the grid is round(side / 8) per axis (VQ spatial factor 8). Emu3-Gen's default area 720x720 gives 90x90
  = 8193 tokens per image; RL here defaults to 512 px (Emu3's stage-1 resolution): 64x64 grid, 4163 tokens
  (4096 free choices + 64 EOL + 3 trailer tokens).
- CFG as released: a negative prompt, and the guided distribution s (log_softmax c - log_softmax u) +
  log_softmax u. We normalise both rows with log_softmax and hand them to `process_logits`, which then applies the
  same u + s (c - u), temperature, top-k and top-p in sampling and scoring alike. The release samples with top_k
  2048; the policy leaves top-k to the run config. The release runs the negative prompt as its own sequence with
  its own KV cache (transformers' unbatched-CFG logits processor, one extra forward per token); the sampler here
  batches it below the conditional rows instead, left-padded to one width (`guidance_rows`): positions come from
  the mask, so every row's distribution is the unbatched one (equal up to float rounding), and a step reads the
  weights once instead of twice. Scoring batches them the same way (`scoring_streams`).
- Pixels: the image processor's `postprocess` (unnormalise with mean/std 0.5, times 255, clip, `astype(uint8)`),
  i.e. (x + 1) / 2 * 255 truncated, not rounded (`truncated_pixels`).

Deliberate choices:
- The negative prompt carries the image header (`negative_prompt_header=True`), as BAAI's release builds it (both
  prompts go through the same processor call); transformers' docs example leaves the header out. Set
  `negative_prompt_header=False` for the docs' variant. The negative prompt ids used in sampling are stored in the
  rollout (`extras`), so scoring always uses exactly the negative rows the samples were drawn with.
- Restricted-vocabulary head: at image positions only the 32768 visual-token rows of `lm_head.weight` are applied
  to the final hidden states (a slice, no copy), so full-vocabulary (~184k) logits are never materialised; the
  distribution is the release's one (its prefix constraint also allows only visual tokens there).
- Positions come from the attention mask (cumsum - 1), in sampling and scoring, as Emu3's `generate` does.
- Scoring runs the transformer once over both row sets (conditional, negative) and then applies the head in
  chunks of `score_chunk_size` positions, each chunk under activation checkpointing when gradients are on, so only
  the hidden states are kept for backward and the [N, chunk, 32768] logits exist one chunk at a time.
- No image head is trained in full (`modules_to_save` is empty): the visual rows live inside the ~184k-row
  `lm_head` (0.75B parameters at 8B), and peft's modules_to_save would copy and train all of it (Adam states
  included) to move 32768 rows. LoRA on the language model moves the hidden states that those rows read.

Think-then-draw (policies/plan.py; the release has no such mode, so every choice here is ours):
- Plan-writing prompt: Emu3-Gen has no chat template, so the plan continues the caption: BOS + request (the plan
  instruction around the prompt) + the release suffix, i.e. the release prompt without its image header (the suffix
  sits before the plan because the header has to follow the plan directly). The plan is followed by the header
  `<|image start|>{H}*{W}<|image token|>` (`image_prefix_ids`, tokenized alone: the special tokens around "{H}*{W}"
  split it off, as in the processor's prompt). A plan stops at the end marker (EOS `<|extra_204|>` by default), at
  `<|image start|>` (Emu3's generation sequences put it right after the caption, so it is the plan's natural end;
  the header then goes on from the plan's own BOI), or at `max_tokens`. An empty plan (BOI at once) conditions the
  image exactly like the release prompt.
- The plan is written by the full `lm_head` (text steps need the whole vocabulary: 184622 logits per position, fine
  for a short plan; the prompt positions' logits are computed too, in the prefill and when scoring), with the
  visual tokens, the image markup but `<|image start|>`, every reserved `<|extra_N|>` token (EOL, EOF, BOS, ...),
  and pad banned (`plan_banned_ids`; never the end marker). The image span keeps the restricted head and the forced
  layout, and is the same H (W + 1) + 3 tokens after the plan span as without a plan.
- CFG: the negative prompt stays the release's fixed text (with its header as configured): the unconditional
  branch does not see the plan, so the guidance contrasts "prompt + plan" against the same negative as without a
  plan. The plan itself is text and is sampled and scored without CFG.
- The image context is the plan prompt + plan span (end marker and padding masked out, not removed) + header, one
  row per sample (the sampler's prefill is per row then; without a plan it is per prompt and shared by the group,
  as before). Positions come from the mask, so sampling (KV cache with holes) and scoring (one forward with the
  same mask) see the same sequence as the compact one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from policies import tiny as toy
from policies.base import Policy, Rollout, SamplingSettings, Stream, rows_below, truncated_pixels

RELEASE_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
RELEASE_PROMPT_SUFFIX = " masterpiece, film grained, best quality."
EOL_TOKEN, EOF_TOKEN = "<|extra_200|>", "<|extra_201|>"
EXTRA_TOKEN = re.compile(r"<\|extra_\d+\|>")  # reserved tokens: EOL, EOF, BOS, EOS, ...
VQ_SPATIAL_FACTOR = 8  # Emu3Processor.downsample_ratio: pixels per token side, used to size the grid
DEFAULT_RESOLUTION = 512  # 64x64 grid, 4163 completion tokens
POLICY_SETTINGS_FILE = "emu3_policy.json"  # the prompt/size settings, written next to the weights
TINY_RESOLUTION = 32  # 4x4 grid, 23 completion tokens (8 px images from the tiny decoder)
RELEASE_SETTINGS = {"resolution": DEFAULT_RESOLUTION, "negative_prompt": RELEASE_NEGATIVE_PROMPT,
                    "negative_prompt_header": True, "prompt_suffix": RELEASE_PROMPT_SUFFIX}


def _saved_settings(model_name_or_path: str | None) -> dict:
    """Settings a local folder written by `save_pretrained` carries (none for a hub id or a plain checkpoint)."""
    if model_name_or_path is None or not (Path(model_name_or_path) / POLICY_SETTINGS_FILE).is_file():
        return {}
    saved = json.loads((Path(model_name_or_path) / POLICY_SETTINGS_FILE).read_text())
    unknown = set(saved) - set(RELEASE_SETTINGS)
    if unknown:
        raise ValueError(f"{POLICY_SETTINGS_FILE} in {model_name_or_path} has unknown keys {sorted(unknown)}")
    return saved


class Emu3Policy(Policy):
    name = "emu3"
    # Only the text model has *_proj layers that take part in generation; the regex keeps the VQ model out.
    lora_target_modules = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save: list[str] = []  # see the module docstring
    # The release's CFG scale 3.0; its top-k 2048 is left off (module docstring: a truncated distribution gives
    # -inf log-probs to codes the updated policy may want), so RL samples the full guided distribution.
    default_sampling = SamplingSettings(cfg_scale=3.0, temperature=1.0)
    release_sampling = SamplingSettings(cfg_scale=3.0, temperature=1.0, top_k=2048)  # its GenerationConfig

    def __init__(
        self,
        model,
        processor,
        resolution: int = DEFAULT_RESOLUTION,
        negative_prompt: str = RELEASE_NEGATIVE_PROMPT,
        negative_prompt_header: bool = True,
        prompt_suffix: str = RELEASE_PROMPT_SUFFIX,
        decode_batch_size: int = 8,
        score_chunk_size: int = 1024,
    ):
        self.model = model
        self.processor = processor
        self.negative_prompt = negative_prompt
        self.negative_prompt_header = negative_prompt_header
        self.prompt_suffix = prompt_suffix
        self.decode_batch_size = decode_batch_size
        if score_chunk_size < 1:
            raise ValueError(f"score_chunk_size must be >= 1, got {score_chunk_size}")
        self.score_chunk_size = score_chunk_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"

        # Grid and image size, computed as the processor computes the header it writes.
        if resolution < VQ_SPATIAL_FACTOR:
            raise ValueError(f"resolution must be >= {VQ_SPATIAL_FACTOR} px, got {resolution}")
        self.resolution = resolution
        self.image_area = resolution * resolution
        self.height, self.width = processor.calculate_generate_size("1:1", self.image_area, VQ_SPATIAL_FACTOR)
        self.image_size = self.width * model.model.vqmodel.spatial_scale_factor

        # Structural tokens, resolved by name.
        def token_id(token: str) -> int:
            index = tokenizer.convert_tokens_to_ids(token)
            if index is None or index == tokenizer.unk_token_id:
                raise ValueError(f"Emu3 tokenizer lacks the token {token!r}")
            return index

        self.eol_id, self.eof_id = token_id(EOL_TOKEN), token_id(EOF_TOKEN)
        self.eoi_id = token_id(tokenizer.eoi_token)
        # EOS as the model is configured (`<|extra_204|>` in the release), which is what the release's layout ends with
        self.eos_id = model.config.text_config.eos_token_id
        if not isinstance(self.eos_id, int):
            raise ValueError(f"expected one EOS id in the Emu3 text config, got {self.eos_id!r}")

        # Visual tokens: code k is BPE id visual_start + k (checked, the restricted head relies on it).
        img2bpe = model.vocabulary_mapping.img2bpe
        self.num_codes = model.config.vq_config.codebook_size
        ids = [img2bpe.get(k) for k in range(self.num_codes)]
        if None in ids or ids != list(range(ids[0], ids[0] + self.num_codes)):
            raise ValueError(f"expected {self.num_codes} visual tokens with contiguous ids in the vocabulary map")
        self.visual_start = ids[0]

        # Think-then-draw: the header that follows a plan, and the tokens a plan may not write (see the hooks).
        header = f"{tokenizer.boi_token}{self.height}*{self.width}{tokenizer.image_wrapper_token}"
        self._image_header_ids = tokenizer(header, add_special_tokens=False)["input_ids"]
        boi_id = token_id(tokenizer.boi_token)
        if self._image_header_ids[0] != boi_id:
            raise ValueError(f"Emu3 image header {header!r} does not start with <|image start|> when tokenized")
        markup = [token_id(t) for t in (tokenizer.eoi_token, tokenizer.image_wrapper_token, tokenizer.image_token)]
        extras = [i for t, i in tokenizer.get_vocab().items() if EXTRA_TOKEN.fullmatch(t)]
        banned = set(range(self.visual_start, self.visual_start + self.num_codes)) | set(markup) | set(extras)
        banned |= {tokenizer.bos_token_id, tokenizer.pad_token_id, self.eol_id, self.eof_id}
        self._plan_banned = sorted(banned - {boi_id, None})

        # The completion layout: H rows of (W codes, EOL), then EOF, EOI, EOS. forced_tokens is -1 where free.
        row = [-1] * self.width + [self.eol_id]
        layout = torch.tensor(row * self.height + [self.eof_id, self.eoi_id, self.eos_id], dtype=torch.long)
        self.forced_tokens = layout
        self.free_positions = (layout < 0).nonzero().squeeze(-1)  # where the policy chooses a code
        self.num_image_tokens = layout.numel()

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model_name_or_path: str | None = None, tiny: bool = False, dtype: str = "float32", *,
              resolution: int | None = None, negative_prompt: str | None = None,
              negative_prompt_header: bool | None = None, prompt_suffix: str | None = None,
              decode_batch_size: int = 8, score_chunk_size: int = 1024, tiny_palette: list[str] | None = None,
              seed: int = 0) -> "Emu3Policy":
        """Real weights by hub id or local path, or (`tiny=True`) the same architecture with random weights.

        `resolution`: image side in pixels (square); default 512 (4163 tokens), tiny 32 (4x4 grid, 23 tokens).
        `negative_prompt`, `negative_prompt_header`, `prompt_suffix`: default to the release's (see module docs).
        Options left at None are taken from a folder written by `save_pretrained` (POLICY_SETTINGS_FILE) when there
        is one, so a saved policy samples as it did before saving.
        `tiny_palette` (tiny only): fit the random VQ decoder so that code k paints `tiny_palette[k % len]`.
        """
        from transformers import Emu3ForConditionalGeneration, Emu3Processor

        torch_dtype = getattr(torch, dtype)
        if tiny:
            torch.manual_seed(seed)
            model, processor = toy.tiny_emu3(EOL_TOKEN, EOF_TOKEN)
            resolution = resolution or TINY_RESOLUTION
            if tiny_palette:
                vq = model.model.vqmodel
                grid = round(resolution / VQ_SPATIAL_FACTOR)
                toy.fit_decoder_to_palette(lambda codes: vq.decode(codes.view(-1, grid, grid)), vq.parameters(),
                                       vq.config.codebook_size, grid, tiny_palette, steps=200, lr=1e-2, seed=seed)
            model.to(torch_dtype)
        else:
            model = Emu3ForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch_dtype)
            processor = Emu3Processor.from_pretrained(model_name_or_path)
        given = {"resolution": resolution, "negative_prompt": negative_prompt,
                 "negative_prompt_header": negative_prompt_header, "prompt_suffix": prompt_suffix}
        settings = {**RELEASE_SETTINGS, **_saved_settings(model_name_or_path),
                    **{k: v for k, v in given.items() if v is not None}}
        policy = cls(model, processor, **settings, decode_batch_size=decode_batch_size,
                     score_chunk_size=score_chunk_size)
        return policy

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        settings = {"resolution": self.resolution, "negative_prompt": self.negative_prompt,
                    "negative_prompt_header": self.negative_prompt_header, "prompt_suffix": self.prompt_suffix}
        (Path(path) / POLICY_SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    # -- prompts ------------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str], with_header: bool) -> tuple[Tensor, Tensor]:
        if with_header:
            batch = self.processor(text=texts, return_for_image_generation=True, ratio="1:1",
                                   image_area=self.image_area, padding=True, return_tensors="pt")
            if [list(s) for s in batch["image_sizes"]] != [[self.height, self.width]] * len(texts):
                raise RuntimeError(f"processor header {batch['image_sizes'][0]} != grid {self.height}x{self.width}")
        else:
            batch = self.processor(text=texts, padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """BOS + prompt (+ release suffix) + image header, left-padded."""
        if not prompts:
            raise ValueError("no prompts given")
        return self._encode([p + self.prompt_suffix for p in prompts], with_header=True)

    def encode_negative_prompt(self) -> tuple[Tensor, Tensor]:
        """[1, Q]: BOS + negative prompt (+ the image header when `negative_prompt_header`), tokenized once per
        setting and device (sampling needs it for its stream and for the rollout's record)."""
        key = (self.negative_prompt, self.negative_prompt_header, self.device)
        if getattr(self, "_negative", (None,))[0] != key:
            self._negative = (key, self._encode([self.negative_prompt], with_header=self.negative_prompt_header))
        return self._negative[1]

    # -- think-then-draw hooks (policies/plan.py): a caption continuation before the image header ---------------

    @property
    def plan_tokenizer(self):
        """The processor's tokenizer: like the release's it adds no BOS, so `plan_prompt_text` writes it."""
        return self.processor.tokenizer

    def plan_prompt_text(self, request: str) -> str:
        """BOS + request + the release suffix: the release prompt without its image header, which follows the plan
        (so an empty plan, one that writes `<|image start|>` at once, gives exactly the release prompt)."""
        return self.processor.tokenizer.bos_token + request + self.prompt_suffix

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        """Full-vocabulary logits (text steps need them; a plan is short), unlike the restricted image head."""
        return self.model.lm_head(self.hidden_states(ids, mask, positions, cache))

    @property
    def image_prefix_ids(self) -> list[int]:
        """`<|image start|>{H}*{W}<|image token|>`, the header the processor appends to a generation prompt."""
        return self._image_header_ids

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
        """Visual tokens, image markup but `<|image start|>`, the reserved `<|extra_N|>` tokens (EOL and EOF among
        them), BOS and pad; never the plan's end marker."""
        return [i for i in self._plan_banned if i != end_marker_id]

    # -- the engine's hooks (policies/base.py) ------------------------------------------------------------------

    @property
    def cache_config(self):
        return self.model.config.text_config

    @property
    def decoder_stack(self) -> nn.Module:
        return self.model.model.text_model

    def visual_logits(self, hidden: Tensor) -> Tensor:
        """Logits over the codebook [..., K]: only the visual-token rows of lm_head (column k = code k)."""
        weight = self.model.lm_head.weight[self.visual_start : self.visual_start + self.num_codes]
        return F.linear(hidden, weight)

    def image_logits(self, hidden: Tensor) -> Tensor:
        """The release's CFG mixes log-softmaxes, so the image head normalises its logits; `process_logits` then
        applies u + s (c - u) to them (module docstring)."""
        return torch.log_softmax(self.visual_logits(hidden).float(), dim=-1)

    def image_token_ids(self, index: Tensor) -> Tensor:
        return index + self.visual_start

    def image_choice_index(self, token_ids: Tensor) -> Tensor:
        return token_ids - self.visual_start

    @property
    def forced_image_tokens(self) -> Tensor:
        return self.forced_tokens

    def guidance_rows(self, ids: Tensor, mask: Tensor, guided: bool) -> tuple[Tensor, Tensor]:
        """Batched CFG (the release runs the negative prompt unbatched; module docstring): one negative-prompt row
        per context row, below the conditional rows, both left-padded to one width. Positions come from the mask,
        so the padding shifts nothing and each row's distribution is the unbatched one; one forward of 2N rows
        reads the weights once a step where two forwards read them twice."""
        if not guided:
            return ids, mask
        return rows_below(ids, mask, *self.encode_negative_prompt(), self.processor.tokenizer.pad_token_id)

    def scoring_streams(self, rollout: Rollout, ids: Tensor, mask: Tensor, guided: bool) -> list[Stream]:
        """Scoring uses exactly the negative rows the samples were drawn with (kept in the rollout), batched below
        the conditional rows as sampling batches them (`guidance_rows`): one teacher-forced forward of 2N rows
        instead of two of N, so the weights are read once."""
        if not guided:
            return [Stream(ids, mask, 1)]
        negative = rollout.extras["negative_ids"], rollout.extras["negative_mask"]
        return [Stream(*rows_below(ids, mask, *negative, self.processor.tokenizer.pad_token_id), 1)]

    def rollout_extras(self, n: int, generator: torch.Generator | None) -> dict:
        neg_ids, neg_mask = self.encode_negative_prompt()
        return {"negative_ids": neg_ids.expand(n, -1).clone(), "negative_mask": neg_mask.expand(n, -1).clone()}

    def check_image_tokens(self, image_ids: Tensor) -> None:
        forced = self.forced_tokens.to(image_ids.device)
        if image_ids.shape[1] != forced.numel():
            raise ValueError(f"image span has {image_ids.shape[1]} tokens, this policy's layout "
                             f"({self.height}x{self.width}) has {forced.numel()}")
        free = forced < 0
        codes = image_ids[:, free] - self.visual_start
        if not (image_ids[:, ~free] == forced[~free]).all() or ((codes < 0) | (codes >= self.num_codes)).any():
            raise ValueError("completion does not follow the Emu3 layout (visual tokens, EOL per row, EOF EOI EOS)")

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        self.check_image_tokens(rollout.image_ids)
        images = []
        for chunk in rollout.image_ids.split(self.decode_batch_size):
            pixels = self.model.decode_image_tokens(image_tokens=chunk, height=self.height, width=self.width)
            pixels = truncated_pixels(pixels)  # [B, 3, H, W]; the release's postprocess truncates (astype uint8)
            images.extend(Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy())
        return images


