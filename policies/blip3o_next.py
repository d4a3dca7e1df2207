"""BLIP3o-NEXT (`BLIP3o/BLIP3o-NEXT-{SFT,GRPO-Geneval,GRPO-TexT}-3B`): an autoregressive Qwen3 backbone that samples
discrete image tokens, and a frozen diffusion decoder (SANA-1.5 + DC-AE) that turns their hidden states into pixels.

Release facts the code relies on (JiuhaiChen/BLIP3o, branch BLIP3o-NEXT; ../shared/notes/models.md §4):
- Backbone: `Qwen3ForCausalLM` ("3B" = Qwen3-1.7B) with added tokens `<im_start>`/`<im_end>` (not Qwen's
  `<|im_start|>`), scale tokens `<S0>`..`<S2>` and image tokens `<I0>`..`<I65535>` (TA-Tok codebook index k is
  vocabulary id `config.image_start_token_id + k`). Ids come from the checkpoint's config.json
  (`image_start_tag_id`, `image_end_tag_id`, `image_start_token_id`, `scale_start_token_id`).
- Prompt: the tokenizer's chat template with system "You are a helpful assistant." and user "Please generate image
  based on the following caption: {prompt}", generation prompt on, then `<im_start><S0>`; then 729 image tokens
  (27x27 grid).
- Decoder: the last-layer hidden states of `<S0>` and the 729 image tokens (730 vectors) go through
  `diffusion_connector` = Linear(hidden, 2304), tanh-GELU, Linear(2304, 2304), RMSNorm(2304, eps 1e-5) and
  condition diffusers' `SanaTransformer2DModel` (SANA-1.5 1.6B, 1024 px, 32x32 latents); flow-match Euler with
  sigmas linspace(1, 1/steps, steps), 30 steps, CFG 2.0 against the connector applied to an all-zero condition
  (rows [null, cond]); the timestep passed to Sana is sigma * 1000 in float32; `AutoencoderDC` decodes
  latents / scaling_factor. Here diffusers' `FlowMatchEulerDiscreteScheduler` runs that loop
  (`policies/modules/sana_decoder.py`).
  The Sana and DC-AE configs come from the hub id in `diffusion_name_or_path`
  (`Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers`, subfolders `transformer/`, `vae/`); the weights are in
  the BLIP3o checkpoint itself under `model.sana.*`, `model.sana_vae.*`, `model.diffusion_connector.*`.
  The release builds its scheduler with `FlowMatchEulerDiscreteScheduler.from_pretrained` on that repo's
  DPM-Solver config, whose shift key (`flow_shift`) the Euler class does not read, so the shift is 1.0
  [inferred]; `diffusion_shift` makes it configurable.
- Keys in the checkpoint that text-to-image never uses are skipped on load: `model.vision_tower.*` (TA-Tok, an
  image encoder for understanding) and `model.vae_connector.*`. The original code downloads TA-Tok at import
  time; nothing here imports it.
- Sampling in the release: no AR-side CFG and the full vocabulary everywhere. Its GRPO sampler
  (`blip3o_qwen_grpo.py`, `generate_images`) calls `generate(do_sample=True, temperature=1.0)` and nothing else, so
  the checkpoint's generation config decides truncation: transformers' default top-k 50 unless that config says
  otherwise. Its trainer then scores the untruncated distribution (`logits / temperature`, log-softmax over the
  full vocabulary), so the release samples from one distribution and trains on the log-probs of another. Its
  inference script (`inference.py`) samples with top-p 0.95, top-k 1200 at temperature 1 (`release_sampling`).

Deliberate differences, all stated:
- Actions are the image tokens. By default sampling is restricted to the 65536 image-token ids, and only those
  rows of `lm_head` are applied (full-vocabulary logits are never formed at image positions); the original samples
  from the full vocabulary (`restrict_to_image_tokens=False` reproduces that; the decoder then reads whatever
  tokens were sampled, as in the release).
- AR-side CFG is available (`cfg_scale` != 1; the release uses none): the unconditional row is the same template
  with an empty caption. Guided logits are u + s (c - u), via `policies.base.process_logits`.
- The initial diffusion noise is seeded per row (`rollout.extras["decode_seed"]`, drawn from the sampling
  generator after the tokens), so one rollout always decodes to the same images; the release draws unseeded noise,
  which makes its environment stochastic for fixed tokens.
- Sampling here (`default_sampling`): temperature 1, no truncation, no AR-side CFG, and the same distribution in
  sampling and scoring. So it differs from the release's RL sampler by the top-k 50 that `generate` applies there
  (and by the image-token restriction below); `top_k=50` reproduces that truncation, in sampling and scoring alike.
- The decoder's hidden states come from a forward with the attention mask. The release's second (hidden-state)
  forward, `self.model(input_ids=gen_ids)`, passes no attention mask, so a left-padded row attends to its padding;
  positions are not the difference (with padding masked out, RoPE sees only relative positions, so plain and
  mask-derived positions give the same states).
- The decoder reads the hidden states of the backbone as it is at decode time (with the LoRA adapter on), as the
  release does with its trained model: the "environment" is the frozen connector + Sana + DC-AE. So the adapter
  also moves the decoder's input along a path the policy gradient does not see;
  `decode_with_reference_backbone=True` reads the adapter-off backbone instead, which makes the image a function
  of the tokens alone.
- Tiny toy world (`tiny=True, tiny_palette=[...]`, tests and demos only): a random decoder paints every token grid
  the same colour, so `policies.tiny.fit_diffusion_decoder_to_palette` fits the tiny DC-AE, Sana and connector for a
  few seconds so that image token k paints palette colour k % len(palette) at its place in the grid.

Think-then-draw (policies/plan.py):
- Plan prompt: the released prompt itself, i.e. the tokenizer's chat template with the system prompt and the
  release's generation instruction around the plan-writing request ("Please generate image based on the following
  caption: {request}"; with the default request "{prompt}" this is exactly the no-plan prompt), generation prompt on.
  The plan is the assistant's text between the generation prompt and `<im_start><S0>` (`image_prefix_ids`), written
  with the full `lm_head`. The image follows "...assistant\n{plan}<im_start><S0>", the release's layout with the
  plan in front of the image tag.
- End marker: Qwen's `<|im_end|>` unless `end_marker` is set, whatever the tokenizer calls EOS. It ends an
  assistant turn in the chat template the plan is written in; Qwen3's post-trained tokenizers (which BLIP3o-NEXT
  extends [inferred]) name it EOS anyway, but Base tokenizers name `<|endoftext|>`, the pre-training document separator, which
  a chat-tuned model does not write after its answer. `<im_start>` (begin-of-image) also stops a plan; the
  prefix's `<im_start>` column is then masked out and the plan's one is used.
- A plan may not write (`plan_banned_ids`): the image tokens `<I*>`, the scale tokens `<S0>`..`<S2>`, `<im_end>`
  (all meaningful only inside an image), and the tokenizer's EOS and pad tokens unless one is the end marker. In
  Qwen3's tokenizers one of them is `<|endoftext|>` (post-trained: pad; Base: EOS), the pre-training document
  separator at which Qwen's generation config also stops: banning it keeps it out of the image's context.
- The decoder reads the hidden states of `<S0>` and the image tokens, which now depend on the plan through
  attention: `decode` rebuilds the same per-row context (prompt + plan + `<im_start><S0>`, positions from the mask,
  end marker and padding masked out) that sampling and scoring use (`image_context`), so a plan rollout decodes
  reproducibly, and to different pixels under a different plan.
- AR-side CFG (ours, off as released): the unconditional row stays the empty-caption template + `<im_start><S0>`,
  without the plan. Guidance pushes towards prompt and plan together, as Janus's blanked null row does; an
  "empty caption + plan" row would guide towards the prompt only and make the null row depend on the sample.
  The plan itself is sampled without CFG (it is text).
- Without a plan nothing changes: the group shares its prompt's prefill, and every draw from the generator
  happens in the same order as before.

Memory: the reference policy for KL is the same backbone with the LoRA adapter disabled, and the decoder is never
copied. The original GRPO trainer (beta 0.001) keeps a full second copy of the whole stack as its reference model.
From the released component sizes (parameters counted by building the architectures on the meta
device: a Qwen3-1.7B config with the 217,477-token vocabulary, diffusers' SanaTransformer2DModel defaults = Sana
1600M, AutoencoderDC defaults = DC-AE f32c32): backbone 1.41B non-embedding + 0.45B embedding (head tied as in
Qwen3-1.7B; 2.30B if untied) = 1.85B; SANA-1.5 1.60B; DC-AE 0.36B; connector 0.01B; plus TA-Tok's
SigLIP2-so400m encoder, ~0.4B: about 4.2B parameters, 8.5 GB in bf16 (the hub lists the GRPO checkpoints at ~4B).
This policy holds none of it twice: ~8.5 GB of weights saved against the original trainer, and still the decoder's
1.98B = 4.0 GB against a reference that would copy the backbone only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from policies import tiny as toy
from policies.base import Policy, Rollout, SamplingSettings, draw_seeds, position_ids_from_mask, rows_below
from policies.checkpoints.blip3o_next import (CONNECTOR_PREFIX, DEFAULT_DIFFUSION_REPO, SANA_CONFIG_DIR, SANA_PREFIX,
                                              VAE_CONFIG_DIR, VAE_PREFIX, load_blip3o_next)
from policies.modules.sana_decoder import DiffusionDecoder

SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_INSTRUCTION = "Please generate image based on the following caption: {prompt}"
TOKENS_PER_IMAGE = 729  # 27 x 27
PLAN_END_MARKER = "<|im_end|>"  # Qwen's end of turn: the plan's default end marker
SCALE_TOKENS = ("<S0>", "<S1>", "<S2>")
CODEBOOK_SIZE = 65536  # TA-Tok
CONNECTOR_DIM = 2304  # Sana caption_channels
DIFFUSION_GUIDANCE_SCALE = 2.0
DIFFUSION_STEPS = 30


# ----------------------------------------------------------------------------------------------------------------
# The policy


class Blip3oNextPolicy(Policy):
    name = "blip3o_next"
    decode_reads_language_model = True  # decoder_hidden_states: the LM's states drive Sana
    # self.model is the Qwen3 backbone only (the decoder lives outside it), so plain names are safe.
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # The image head: lm_head trained in full (peft modules_to_save) when `train_image_heads` is on. Only its
    # image-token rows are ever read, so only they get gradients. Real runs keep it off (LoRA only): a full copy of
    # the 217k-row head costs ~3.5 GB of fp32 optimizer state.
    modules_to_save = ["lm_head"]
    # The release's RL temperature, without the top-k 50 its generate() adds (module docstring), no AR-side CFG.
    default_sampling = SamplingSettings(cfg_scale=1.0, temperature=1.0)
    release_sampling = SamplingSettings(cfg_scale=1.0, temperature=1.0, top_k=1200, top_p=0.95)  # its inference.py
    default_plan_end_marker = PLAN_END_MARKER

    def __init__(
        self,
        model,
        tokenizer,
        decoder: DiffusionDecoder,
        *,
        ids: dict[str, int],
        tokens_per_image: int = TOKENS_PER_IMAGE,
        codebook_size: int = CODEBOOK_SIZE,
        restrict_to_image_tokens: bool = True,
        diffusion_guidance_scale: float = DIFFUSION_GUIDANCE_SCALE,
        diffusion_steps: int = DIFFUSION_STEPS,
        diffusion_shift: float = 1.0,
        decode_batch_size: int = 16,
        diffusion_name_or_path: str = DEFAULT_DIFFUSION_REPO,
        release_config: dict | None = None,
        decode_with_reference_backbone: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            raise ValueError("the BLIP3o-NEXT tokenizer needs a pad token")
        self.ids = dict(ids)
        self.image_start = ids["image_start_token_id"]  # vocabulary id of <I0>
        self.codebook_size = codebook_size
        vocab = model.config.vocab_size
        if self.image_start + codebook_size > vocab:
            raise ValueError(f"image tokens <I0>..<I{codebook_size - 1}> from id {self.image_start} do not fit the "
                             f"vocabulary of {vocab}")
        if diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
        self.num_image_tokens = tokens_per_image
        self.restrict_to_image_tokens = restrict_to_image_tokens
        self.diffusion_guidance_scale = diffusion_guidance_scale
        self.diffusion_steps = diffusion_steps
        self.diffusion_shift = diffusion_shift
        self.decode_batch_size = decode_batch_size
        self.diffusion_name_or_path = diffusion_name_or_path
        self.release_config = dict(release_config or {})
        self.decode_with_reference_backbone = decode_with_reference_backbone
        self.image_size = decoder.image_size
        self._uncond_ids: Tensor | None = None
        self._image_only_ids: list[int] | None = None

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model_name_or_path: str | None = None, tiny: bool = False, dtype: str = "float32", *,
              decoder_dtype: str | None = None, decode_batch_size: int = 16, restrict_to_image_tokens: bool = True,
              decode_with_reference_backbone: bool = False, diffusion_guidance_scale: float | None = None,
              diffusion_steps: int | None = None, diffusion_shift: float | None = None,
              diffusion_name_or_path: str | None = None, tiny_palette: list[str] | None = None,
              tiny_palette_steps: int = 80, seed: int = 0) -> "Blip3oNextPolicy":
        """Real weights (hub id or local folder, release layout or ours), or `tiny=True`: the same architectures
        with random weights (16 image tokens from a 64-code book, 2 Euler steps, 32 px).

        `diffusion_name_or_path` overrides the checkpoint's Sana repo (e.g. a local copy when offline).
        Diffusion settings left at None come from the checkpoint (fields written by our save_pretrained), else
        the release values: guidance 2.0, 30 Euler steps, shift 1.0 (tiny: 2 steps).
        `tiny_palette` (tiny only): fit the connector, Sana and DC-AE for a few seconds so that image token k
        paints `tiny_palette[k % len]` at its place in the grid (the toy world of the demo reward).
        """
        torch_dtype = getattr(torch, dtype)
        decoder_torch_dtype = getattr(torch, decoder_dtype) if decoder_dtype else torch_dtype
        options = dict(restrict_to_image_tokens=restrict_to_image_tokens, decode_batch_size=decode_batch_size,
                       decode_with_reference_backbone=decode_with_reference_backbone)
        diffusion = {k: v for k, v in (("diffusion_guidance_scale", diffusion_guidance_scale),
                                       ("diffusion_steps", diffusion_steps), ("diffusion_shift", diffusion_shift))
                     if v is not None}
        if tiny:
            torch.manual_seed(seed)
            model, tokenizer, decoder, ids, extra = toy.tiny_blip3o_next()
            policy = cls(model, tokenizer, decoder, ids=ids, **{"diffusion_steps": 2, **diffusion}, **extra,
                         **options)
            if tiny_palette:
                toy.fit_diffusion_decoder_to_palette(policy, tiny_palette, steps=tiny_palette_steps, seed=seed)
        else:
            if tiny_palette:
                raise ValueError("tiny_palette applies to tiny=True only")
            parts = load_blip3o_next(model_name_or_path, diffusion_name_or_path)
            saved = parts.pop("saved")  # the blip3o_* fields our save_pretrained writes into config.json
            for name, default in (("diffusion_guidance_scale", DIFFUSION_GUIDANCE_SCALE),
                                  ("diffusion_steps", DIFFUSION_STEPS), ("diffusion_shift", 1.0)):
                diffusion.setdefault(name, type(default)(saved.get(name, default)))
            policy = cls(**parts, tokens_per_image=int(saved.get("tokens_per_image", TOKENS_PER_IMAGE)),
                         codebook_size=int(saved.get("codebook_size", CODEBOOK_SIZE)), **diffusion, **options)
        policy.model.to(torch_dtype)
        policy.decoder.to(decoder_torch_dtype)
        return policy

    def modules(self) -> list[nn.Module]:
        return [self.model, self.decoder]

    def save_pretrained(self, path: str) -> None:
        """The release layout (one safetensors state dict with the Qwen keys and `model.sana.*`,
        `model.sana_vae.*`, `model.diffusion_connector.*`; config.json with the release fields), plus the Sana and
        DC-AE configs in `sana/` and `sana_vae/` so that loading needs no hub access, plus the tokenizer."""
        if self.peft_model is not None:
            raise RuntimeError("save the LoRA adapter with policy.peft_model.save_pretrained(...) (or merge it "
                               "first); save_pretrained writes base weights only")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.model.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        for prefix, module in ((SANA_PREFIX, self.decoder.sana), (VAE_PREFIX, self.decoder.vae),
                               (CONNECTOR_PREFIX, self.decoder.connector)):
            state.update({prefix + k: v for k, v in module.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        config = self.model.config.to_dict()
        config.update(self.release_config)
        config.update({
            "architectures": ["blip3oQwenForInferenceLM"],
            "model_type": "blip3o_qwen_inference",
            "diffusion_name_or_path": self.diffusion_name_or_path,
            **self.ids,
            "blip3o_tokens_per_image": self.num_image_tokens,
            "blip3o_codebook_size": self.codebook_size,
            "blip3o_diffusion_guidance_scale": self.diffusion_guidance_scale,
            "blip3o_diffusion_steps": self.diffusion_steps,
            "blip3o_diffusion_shift": self.diffusion_shift,
        })
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.decoder.sana.save_config(str(out / SANA_CONFIG_DIR))
        self.decoder.vae.save_config(str(out / VAE_CONFIG_DIR))
        self.tokenizer.save_pretrained(str(out))

    # -- prompts ------------------------------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The released chat text (system + generation instruction, generation prompt on); `<im_start><S0>` are
        appended as ids by `encode_prompts`."""
        return self.plan_prompt_text(prompt)

    # -- think-then-draw hooks (policies/plan.py): the plan is the assistant's text before <im_start><S0> -------

    @property
    def plan_tokenizer(self):
        return self.tokenizer

    def plan_prompt_text(self, request: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": GENERATION_INSTRUCTION.format(prompt=request)}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        return self.model.get_output_embeddings()(self.hidden_states(ids, mask, positions, cache))

    @property
    def image_prefix_ids(self) -> list[int]:
        return [self.ids["image_start_tag_id"], self.ids["scale_start_token_id"]]

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
        """Image tokens, scale tokens, `<im_end>`, and EOS and pad unless one is the end marker (module docstring)."""
        if self._image_only_ids is None:
            known = [self.tokenizer.convert_tokens_to_ids(t) for t in SCALE_TOKENS]
            known = [i for i in known if i is not None and i != self.tokenizer.unk_token_id]
            image_tokens = range(self.image_start, self.image_start + self.codebook_size)
            self._image_only_ids = sorted({*image_tokens, *known, self.ids["scale_start_token_id"],
                                           self.ids["image_end_tag_id"]})
        specials = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None, end_marker_id}
        return [*self._image_only_ids, *sorted(specials)]

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tail = torch.tensor([self.ids["image_start_tag_id"], self.ids["scale_start_token_id"]])
        ids = torch.cat([ids, tail.expand(len(texts), 2)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(texts), 2)], dim=1)
        return ids.to(self.device), mask.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        return self._tokenize([self.format_prompt(p) for p in prompts])

    def guidance_rows(self, ids: Tensor, mask: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor]:
        """Conditional rows, then (for AR-side CFG) one empty-caption row per conditional row, left-padded to one
        width. A function of (ids, mask) only, so sampling and scoring build the same rows."""
        if not with_uncond:
            return ids, mask
        if self._uncond_ids is None:
            self._uncond_ids = self._tokenize([self.format_prompt("")])[0][0].cpu()
        uncond = self._uncond_ids.to(ids.device)[None]
        return rows_below(ids, mask, uncond, torch.ones_like(uncond, dtype=mask.dtype), self.tokenizer.pad_token_id)

    # -- the engine's hooks (policies/base.py) ------------------------------------------------------------------

    @property
    def decoder_stack(self) -> nn.Module:
        return self.model.model

    def image_logits(self, hidden: Tensor) -> Tensor:
        """Logits at an image position: only the image-token rows of lm_head when restricted (never the full
        vocabulary), otherwise the full head as released."""
        head = self.model.get_output_embeddings()
        if not self.restrict_to_image_tokens:
            return head(hidden)
        rows = slice(self.image_start, self.image_start + self.codebook_size)
        bias = head.bias[rows] if getattr(head, "bias", None) is not None else None
        return nn.functional.linear(hidden, head.weight[rows], bias)

    def image_token_ids(self, index: Tensor) -> Tensor:
        return index + self.image_start if self.restrict_to_image_tokens else index

    def image_choice_index(self, token_ids: Tensor) -> Tensor:
        return token_ids - self.image_start if self.restrict_to_image_tokens else token_ids

    def rollout_extras(self, n: int, generator: torch.Generator | None) -> dict:
        """Drawn after the tokens, so the tokens do not depend on it; fixes each row's diffusion noise."""
        return {"decode_seed": draw_seeds(n, generator, self.device)}

    # -- decoding -----------------------------------------------------------------------------------------------

    def decoder_hidden_states(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor) -> Tensor:
        """Last-layer hidden states of `<S0>` and every image token: [B, T + 1, hidden]."""
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attn = torch.cat([prompt_mask, prompt_mask.new_ones(completion_ids.shape)], dim=1)
        hidden = self.hidden_states(ids, attn, position_ids_from_mask(attn))
        return hidden[:, prompt_ids.shape[1] - 1 :]

    def _decoder_backbone(self):
        """The backbone whose hidden states the decoder reads: as it is now (release), or with the adapter off."""
        if self.decode_with_reference_backbone and self.peft_model is not None:
            return self.reference()
        return contextlib.nullcontext()

    def initial_noise(self, seeds: Tensor) -> Tensor:
        """Per-row initial latents from per-row seeds, drawn on the CPU so they do not depend on the device."""
        shape = self.decoder.latent_shape
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        if "decode_seed" not in rollout.extras:
            raise ValueError("rollout.extras has no 'decode_seed': decode rollouts made by this policy's sample()")
        images = []
        for start in range(0, len(rollout), self.decode_batch_size):
            part = rollout.select(slice(start, start + self.decode_batch_size))
            # the context the image tokens were sampled after (with a plan: prompt + plan + <im_start><S0>)
            context_ids, context_mask = self.image_context(part)
            with self._decoder_backbone():
                hidden = self.decoder_hidden_states(context_ids, context_mask, part.image_ids)
            pixels = self.decoder(hidden, self.initial_noise(part.extras["decode_seed"]),
                                  self.diffusion_guidance_scale, self.diffusion_steps, self.diffusion_shift)
            pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images.extend(Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy())
        return images


