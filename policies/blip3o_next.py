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
  (rows [null, cond]); the timestep passed to Sana is sigma * 1000; `AutoencoderDC` decodes latents / scaling_factor.
  The Sana and DC-AE configs come from the hub id in `diffusion_name_or_path`
  (`Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers`, subfolders `transformer/`, `vae/`); the weights are in
  the BLIP3o checkpoint itself under `model.sana.*`, `model.sana_vae.*`, `model.diffusion_connector.*`.
  The release builds its scheduler with `FlowMatchEulerDiscreteScheduler.from_pretrained` on that repo's
  DPM-Solver config, whose shift key (`flow_shift`) the Euler class does not read, so the shift is 1.0
  [inferred]; `diffusion_shift` makes it configurable.
- Keys in the checkpoint that text-to-image never uses are skipped on load: `model.vision_tower.*` (TA-Tok, an
  image encoder for understanding) and `model.vae_connector.*`. The original code downloads TA-Tok at import
  time; nothing here imports it.
- Sampling as released: the full vocabulary, no AR-side CFG, T = 1 in RL (top_p 0.95 / top_k 1200 at inference).

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
- Positions come from the attention mask (`cumsum - 1`) in sampling, scoring and decoding alike; the release's
  second (hidden-state) forward uses plain positions, which shifts left-padded rows.
- The decoder reads the hidden states of the backbone as it is at decode time (with the LoRA adapter on), as the
  release does with its trained model: the "environment" is the frozen connector + Sana + DC-AE. So the adapter
  also moves the decoder's input along a path the policy gradient does not see;
  `decode_with_reference_backbone=True` reads the adapter-off backbone instead, which makes the image a function
  of the tokens alone.
- Tiny toy world (`tiny=True, tiny_palette=[...]`, tests and demos only): a random decoder paints every token grid
  the same colour, so `fit_decoder_to_palette` fits the tiny DC-AE, Sana and connector for a few seconds so that
  image token k paints palette colour k % len(palette) at its place in the grid.

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
import math
import os
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from policies.base import Policy, Rollout, SamplingSettings, draw_seeds, position_ids_from_mask

SYSTEM_PROMPT = "You are a helpful assistant."
GENERATION_INSTRUCTION = "Please generate image based on the following caption: {prompt}"
TOKENS_PER_IMAGE = 729  # 27 x 27
PLAN_END_MARKER = "<|im_end|>"  # Qwen's end of turn: the plan's default end marker
SCALE_TOKENS = ("<S0>", "<S1>", "<S2>")
CODEBOOK_SIZE = 65536  # TA-Tok
CONNECTOR_DIM = 2304  # Sana caption_channels
DIFFUSION_GUIDANCE_SCALE = 2.0
DIFFUSION_STEPS = 30
DEFAULT_DIFFUSION_REPO = "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"

# config.json fields of the release that this policy reads
RELEASE_ID_FIELDS = ("image_start_tag_id", "image_end_tag_id", "image_start_token_id", "scale_start_token_id")
# checkpoint prefixes
SANA_PREFIX, VAE_PREFIX, CONNECTOR_PREFIX = "model.sana.", "model.sana_vae.", "model.diffusion_connector."
UNUSED_PREFIXES = ("model.vision_tower.", "model.vae_connector.")
# our own layout stores the decoder configs next to the weights (the release reads them from the hub)
SANA_CONFIG_DIR, VAE_CONFIG_DIR = "sana", "sana_vae"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------
# The decoder ("environment"): connector -> Sana flow-match Euler with CFG -> DC-AE


def build_connector(hidden_size: int, caption_channels: int) -> nn.Sequential:
    """The release's `diffusion_connector` (module indices match its checkpoint keys 0, 2, 3)."""
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(caption_channels, eps=1e-5, elementwise_affine=True)
    with torch.no_grad():
        norm.weight.fill_(math.sqrt(5.5))  # the release's initial value (overwritten by loaded weights)
    return nn.Sequential(nn.Linear(hidden_size, caption_channels), nn.GELU(approximate="tanh"),
                         nn.Linear(caption_channels, caption_channels), norm)


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """linspace(1, 1/steps, steps), shifted like diffusers' FlowMatchEulerDiscreteScheduler, plus the final 0."""
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    sigmas = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    return sigmas + [0.0]


class DiffusionDecoder(nn.Module):
    """Frozen connector + SanaTransformer2DModel + AutoencoderDC. `forward` keeps autograd (the tiny toy world is
    fitted through it); the policy calls it under no_grad."""

    def __init__(self, connector: nn.Sequential, sana: nn.Module, vae: nn.Module):
        super().__init__()
        self.connector, self.sana, self.vae = connector, sana, vae

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.sana.config.sample_size
        return (self.sana.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        return self.sana.config.sample_size * 2 ** (len(self.vae.config.decoder_block_out_channels) - 1)

    def forward(self, hidden: Tensor, noise: Tensor, guidance_scale: float, steps: int, shift: float = 1.0) -> Tensor:
        """hidden [B, L, H] last-layer states, noise [B, C, S, S] -> pixels [B, 3, H, W], about [-1, 1]."""
        dtype = next(self.sana.parameters()).dtype
        hidden = hidden.to(next(self.connector.parameters()).dtype)
        # null condition = the connector applied to zeros, as released (rows ordered [null, cond])
        context = self.connector(torch.cat([torch.zeros_like(hidden), hidden])).to(dtype)
        latents = noise.to(dtype)
        sigmas = flow_sigmas(steps, shift)
        for i in range(steps):
            timestep = torch.full((2 * len(latents),), sigmas[i] * 1000.0, device=latents.device, dtype=dtype)
            velocity = self.sana(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=context,
                                 timestep=timestep, return_dict=False)[0]
            null, cond = velocity.float().chunk(2)
            velocity = null + guidance_scale * (cond - null)
            latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * velocity).to(dtype)
        config = self.vae.config
        latents = latents.to(next(self.vae.parameters()).dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# The policy


class Blip3oNextPolicy(Policy):
    name = "blip3o_next"
    # self.model is the Qwen3 backbone only (the decoder lives outside it), so plain names are safe.
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # The image head: lm_head trained in full (peft modules_to_save) when `train_image_heads` is on. Only its
    # image-token rows are ever read, so only they get gradients. Real runs keep it off (LoRA only): a full copy of
    # the 217k-row head costs ~3.5 GB of fp32 optimizer state.
    modules_to_save = ["lm_head"]
    # As released for RL: no AR-side CFG, temperature 1, the full distribution (module docstring).
    default_sampling = SamplingSettings(cfg_scale=1.0, temperature=1.0)
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
    def build(
        cls,
        model_name_or_path: str | None = None,
        tiny: bool = False,
        dtype: str = "float32",
        decoder_dtype: str | None = None,
        device: str | None = None,
        decode_batch_size: int = 16,
        restrict_to_image_tokens: bool = True,
        decode_with_reference_backbone: bool = False,
        diffusion_guidance_scale: float | None = None,
        diffusion_steps: int | None = None,
        diffusion_shift: float | None = None,
        diffusion_name_or_path: str | None = None,
        tiny_palette: list[str] | None = None,
        tiny_palette_steps: int = 80,
        seed: int = 0,
    ) -> "Blip3oNextPolicy":
        """Real weights (hub id or local folder, release layout or ours), or `tiny=True`: the same architectures
        with random weights (16 image tokens from a 64-code book, 2 Euler steps, 32 px).

        `diffusion_name_or_path` overrides the checkpoint's Sana repo (e.g. a local copy when offline).
        Diffusion settings left at None come from the checkpoint (fields written by our save_pretrained), else
        the release values: guidance 2.0, 30 Euler steps, shift 1.0 (tiny: 2 steps).
        `tiny_palette` (tiny only): fit the connector, Sana and DC-AE for a few seconds so that image token k
        paints `tiny_palette[k % len]` at its place in the grid (the toy world of the demo reward).
        """
        if tiny == (model_name_or_path is not None):
            raise ValueError("give exactly one of model_name_or_path=... or tiny=True")
        torch_dtype = getattr(torch, dtype)
        decoder_torch_dtype = getattr(torch, decoder_dtype) if decoder_dtype else torch_dtype
        options = dict(restrict_to_image_tokens=restrict_to_image_tokens, decode_batch_size=decode_batch_size,
                       decode_with_reference_backbone=decode_with_reference_backbone)
        diffusion = {k: v for k, v in (("diffusion_guidance_scale", diffusion_guidance_scale),
                                       ("diffusion_steps", diffusion_steps), ("diffusion_shift", diffusion_shift))
                     if v is not None}
        if tiny:
            torch.manual_seed(seed)
            model, tokenizer, decoder, ids, extra = _tiny_blip3o()
            policy = cls(model, tokenizer, decoder, ids=ids, **{"diffusion_steps": 2, **diffusion}, **extra,
                         **options)
            if tiny_palette:
                fit_decoder_to_palette(policy, tiny_palette, steps=tiny_palette_steps, seed=seed)
        else:
            if tiny_palette:
                raise ValueError("tiny_palette applies to tiny=True only")
            policy = load_blip3o_next(model_name_or_path, diffusion_name_or_path=diffusion_name_or_path, **diffusion,
                                      **options)
        policy.model.to(torch_dtype)
        policy.decoder.to(decoder_torch_dtype)
        for module in (policy.model, policy.decoder):
            module.requires_grad_(False)
            module.eval()
        if device is not None:
            policy.to(device)
        return policy

    def to(self, device: torch.device | str) -> "Blip3oNextPolicy":
        self.model.to(device)
        self.decoder.to(device)
        return self

    def save_pretrained(self, path: str) -> None:
        """The release layout (one safetensors state dict with the Qwen keys and `model.sana.*`,
        `model.sana_vae.*`, `model.diffusion_connector.*`; config.json with the release fields), plus the Sana and
        DC-AE configs in `sana/` and `sana_vae/` so that loading needs no hub access, plus the tokenizer."""
        from safetensors.torch import save_file

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
        uncond = self._uncond_ids.to(ids.device)
        width = max(ids.shape[1], len(uncond))
        pad = self.tokenizer.pad_token_id

        def left_pad(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            extra = width - x.shape[1]
            return (torch.cat([x.new_full((len(x), extra), pad), x], 1), torch.cat([m.new_zeros(len(m), extra), m], 1))

        ids, mask = left_pad(ids, mask)
        u_ids, u_mask = left_pad(uncond.expand(len(ids), -1), torch.ones(len(ids), len(uncond), dtype=mask.dtype,
                                                                         device=mask.device))
        return torch.cat([ids, u_ids]), torch.cat([mask, u_mask])

    # -- the engine's hooks (policies/base.py) ------------------------------------------------------------------

    def hidden_states(self, inputs: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        out = self.model.model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=cache is not None)
        return out.last_hidden_state

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


# ----------------------------------------------------------------------------------------------------------------
# Loading real checkpoints without the original repository


def _resolve_checkpoint(name_or_path: str) -> Path:
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file; give the checkpoint folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", f"{SANA_CONFIG_DIR}/*",
            f"{VAE_CONFIG_DIR}/*"]))
    except Exception as error:  # noqa: BLE001 - any hub/network failure gets the same actionable message
        raise OSError(f"cannot find BLIP3o-NEXT checkpoint {name_or_path!r}: not a local folder, and the hub "
                      f"download failed ({type(error).__name__}: {error}). Download it where the hub is "
                      "reachable and pass the local folder as model_name_or_path.") from error


def _load_state_dict(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard(s) {missing} listed in model.safetensors.index.json are missing")
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _decoder_configs(folder: Path, diffusion_name_or_path: str) -> tuple[dict, dict]:
    """Sana and DC-AE configs: from our layout's subfolders, else from the Sana repo as the release does."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

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


def load_blip3o_next(model_name_or_path: str, *, diffusion_name_or_path: str | None = None,
                     **policy_options) -> Blip3oNextPolicy:
    """Build the policy from a release checkpoint (or our save_pretrained output): Qwen3 backbone, connector, Sana
    and DC-AE from one state dict; field names as in the release config.json."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

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
    release_fields = {k: raw[k] for k in ("mm_vision_tower",) if k in raw}
    for name, default in (("diffusion_guidance_scale", DIFFUSION_GUIDANCE_SCALE), ("diffusion_steps", DIFFUSION_STEPS),
                          ("diffusion_shift", 1.0)):
        policy_options.setdefault(name, type(default)(raw.get("blip3o_" + name, default)))
    return Blip3oNextPolicy(
        backbone, tokenizer, DiffusionDecoder(connector, sana, vae), ids=ids,
        tokens_per_image=int(raw.get("blip3o_tokens_per_image", TOKENS_PER_IMAGE)),
        codebook_size=int(raw.get("blip3o_codebook_size", CODEBOOK_SIZE)),
        diffusion_name_or_path=diffusion, release_config=release_fields, **policy_options)


# ----------------------------------------------------------------------------------------------------------------
# Tiny model and toy world


def _tiny_blip3o():
    """Random tiny Qwen3 + Sana + DC-AE: 16 image tokens (4x4) from 64 codes, 8x8x8 latents, 32 px images."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from policies.tiny import TINY_WORDS, word_level_tokenizer

    codes, grid = 64, 4
    image_tokens = [f"<I{k}>" for k in range(codes)]
    specials = ["<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>", "<S0>", "<S1>", "<S2>", *image_tokens]
    words = [*TINY_WORDS, "system", "user", "assistant", *"you are helpful assistant please generate based "
             "following caption :".split()]
    tokenizer = word_level_tokenizer(specials, words=words)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    ids = {"image_start_tag_id": tokenizer.convert_tokens_to_ids("<im_start>"),
           "image_end_tag_id": tokenizer.convert_tokens_to_ids("<im_end>"),
           "image_start_token_id": tokenizer.convert_tokens_to_ids("<I0>"),
           "scale_start_token_id": tokenizer.convert_tokens_to_ids("<S0>")}
    hidden = 64
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        downsample_block_type="conv", upsample_block_type="interpolate",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    sana = SanaTransformer2DModel(in_channels=8, out_channels=8, num_layers=2, num_attention_heads=2,
                                  attention_head_dim=16, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                  cross_attention_dim=32, caption_channels=64, sample_size=8, patch_size=1)
    connector = build_connector(hidden, sana.config.caption_channels)
    decoder = DiffusionDecoder(connector, sana, vae)
    return model, tokenizer, decoder, ids, {"tokens_per_image": grid * grid, "codebook_size": codes}


def fit_decoder_to_palette(policy: Blip3oNextPolicy, colors: list[str], steps: int = 80, lr: float = 5e-3,
                           seed: int = 0, batch: int = 16) -> tuple[float, float]:
    """The toy world: fit the tiny decoder so that image token k paints `colors[k % len(colors)]` at its own place
    in the grid. A random decoder paints every token grid the same muddy colour, so a colour reward would be flat.

    Two cheap regressions instead of back-propagating through the whole CFG/Euler loop:
    1. DC-AE: a token grid's "colour latent" (a fixed random latent vector per colour, laid out on the token grid)
       decodes to the palette image of that grid;
    2. connector + Sana: flow matching from noise to that latent, conditioned on the backbone's hidden states of
       `<S0>` + the tokens (read as `decode` reads them), with the condition zeroed for 10% of the rows as BLIP3o
       trains it, so that the decoder's CFG against the zero condition is meaningful.
    Token grids range from uniformly random to one colour only (policies/tiny.py). Returns the two final losses.
    """
    from policies.tiny import _training_grids
    from rewards.color import COLORS

    generator = torch.Generator().manual_seed(seed)
    decoder = policy.decoder
    channels, side, _ = decoder.latent_shape
    grid = int(round(policy.num_image_tokens ** 0.5))
    palette = torch.tensor([COLORS[c] for c in colors], dtype=torch.float32) / 127.5 - 1.0  # [K, 3]
    color_latent = torch.randn(len(colors), channels, generator=generator)  # [K, C]
    token_color = torch.arange(policy.codebook_size) % len(colors)
    prompt_ids, prompt_mask = policy.encode_prompts([f"a {c} image" for c in colors])

    def draw(batch: int) -> tuple[Tensor, Tensor, Tensor]:
        codes = _training_grids(batch, policy.num_image_tokens, policy.codebook_size, len(colors), generator)
        colour = token_color[codes].view(batch, grid, grid)
        latents = nn.functional.interpolate(color_latent[colour].permute(0, 3, 1, 2), size=(side, side),
                                            mode="nearest")
        return codes, colour, latents

    def fit(parameters: list[nn.Parameter], loss_fn, steps: int) -> float:
        for p in parameters:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=lr)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            loss = loss_fn()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for p in parameters:
            p.requires_grad_(False)
            p.grad = None
        return loss.item()

    def vae_loss() -> Tensor:
        _, colour, latents = draw(batch // 2)  # the DC-AE is the slow part, and its job is easy
        images = decoder.vae.decode(latents / decoder.vae.config.scaling_factor, return_dict=False)[0]
        target = nn.functional.interpolate(palette[colour].permute(0, 3, 1, 2), size=images.shape[-2:],
                                           mode="nearest")
        return nn.functional.mse_loss(images, target)

    def flow_loss() -> Tensor:
        codes, _, latents = draw(batch)
        rows = torch.randint(0, len(colors), (batch,), generator=generator)
        with torch.no_grad():
            hidden = policy.decoder_hidden_states(prompt_ids[rows], prompt_mask[rows], codes + policy.image_start)
        keep = (torch.rand(batch, 1, 1, generator=generator) >= 0.1).to(hidden.dtype)
        sigma = torch.rand(batch, 1, 1, 1, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = (1 - sigma) * latents + sigma * noise
        velocity = decoder.sana(hidden_states=noisy, encoder_hidden_states=decoder.connector(hidden * keep),
                                timestep=sigma.flatten() * 1000.0, return_dict=False)[0]
        return nn.functional.mse_loss(velocity, noise - latents)

    vae_error = fit(list(decoder.vae.decoder.parameters()), vae_loss, max(steps // 2, 1))
    flow_error = fit(list(decoder.sana.parameters()) + list(decoder.connector.parameters()), flow_loss, steps)
    return vae_error, flow_error
