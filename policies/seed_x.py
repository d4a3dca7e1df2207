"""SEED-X (`AILab-CVC/SEED-X-17B`): LLaMA-2-13B whose image is 64 forced placeholder tokens, drawn by SDXL.

The constrained baseline. After `<img>` the release forces `<img_00000>`..`<img_00063>` and `</img>`; the image is
the de-tokenized final-layer hidden states at those 64 inputs. So the image depends only on the text before `<img>`
(and on the diffusion noise): the token-level policy has no choice inside the image, and GRPO can train only what
the model writes first, i.e. a think-then-draw plan (policies/plan.py). Without a plan `validate_for_training`
refuses to start.

Release facts this file relies on (notes/models.md section 5):
- LLM: an HF Llama folder `llm/` (vocab 32330, hidden 5120, the SFT LoRA merged), loaded with transformers'
  `LlamaForCausalLM`. Tokenizer `cvlm_llama2_tokenizer_100img_and_224loc_addpatch/` (LLaMA + 330 added tokens):
  `<img_00000>`.. = 32000.., `<img>` 32100, `</img>` 32101; checked at load time when the vocabulary has the released
  size, and in any case every special token must exist and be a single token.
- Prompts: SEED-X-I `[INST] Generate an image: {caption} [/INST]\\n` (`prompt_format="instruct"`, default) or
  pretrained SEED-X `{caption}` (`"caption"`); then `<img>`.
- Image features: last-layer hidden states at the 64 positions whose inputs are `<img_00000>`..`<img_00063>` ->
  `output_resampler` (Qwen-VL-style: one `nn.MultiheadAttention` with 64 learned queries + fixed 2-D sin-cos
  positions, kv 5120 -> 4096, 32 heads) -> 64 x 4096.
- De-tokenizer (`seed_detokenizer/first_stage/pytorch_model.bin`): `ResamplerXLV2` (4096 -> 1024, 64 latents, 4
  perceiver layers of 16 x 64 heads; inputs not normalised: the release's de-tokenizer config
  `sdxl_qwen_vit_resampler_l4_q64_pretrain_no_normalize.yaml` sets `normalize: False`;
  `SeedXConfig.detokenizer_normalize`) -> SDXL `prompt_embeds`
  (64 x 2048 = 768 + 1280) and `pooled_prompt_embeds` (1280) in place of both text encoders; diffusers' SDXL UNet
  (base weights, with the released fine-tuned `to_k`/`to_v`), Euler (SDXL scheduler config), guidance 7.5, 50 steps
  (the release's text-to-image scripts; `SDXLAdapter.generate` defaults to 30), 1024 px, time ids (H, W, 0, 0, H, W).
- Negative branch: the release runs the Qwen-VL ViT-G on an all-zero 448 px image (pooled 4x to 64 x 4096) and
  de-tokenizes that. It is a constant: we store those 64 x 4096 features once (`negative_image_embeds.pt`, built by
  `python -m policies.checkpoints.seed_x_negative` from the release's `qwen_vit_G.pt` or Qwen-VL-Chat) and push them
  through the resampler at load time, instead of running the 1.9B vision tower every rollout.

Checkpoint layout read by `build(model_name_or_path=DIR)` (DIR = a variant folder such as `SEED-X-17B/seed_x_i`;
shared pieces are looked up in DIR, then in its parent, as released):
    DIR/llm/                                              HF Llama folder
    DIR/agent/pytorch_model.bin                           `output_resampler.*` (-> OutputResampler, same names);
                                                          `input_resampler.*`, `patch_pos_embed` are unused here
    cvlm_llama2_tokenizer_100img_and_224loc_addpatch/     tokenizer
    seed_detokenizer/first_stage/pytorch_model.bin        `resampler.*` (-> ResamplerXLV2, same names, strict);
                                                          `unet.*` (diffusers UNet2DConditionModel names; must hold
                                                          every `to_k`/`to_v` weight)
    sdxl/ (or `sdxl_path`, default the SDXL base hub id)  diffusers folders unet/, vae/, scheduler/
    negative_image_embeds.pt (or `negative_embeds_path`)  [64, 4096] ViT-G features of the zero image (not released:
                                                          python -m policies.checkpoints.seed_x_negative)
    seed_x_policy.json (optional)                         our module sizes and decode settings (defaults: release)
A missing piece is an error that names it. The original repository is not imported.

Deliberate deviations: the forced tokens use a hard -inf mask (the release adds +10 to the forced logit, a soft force
under sampling), so they have log-prob exactly 0 and no gradient; padding masks are honoured (the release's xformers
Llama ignores them, so it is only safe unbatched); the diffusion noise is seeded per sample from the rollout's
generator, so a rollout decodes reproducibly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from policies import tiny as toy
from policies.base import ImageSample, Policy, Rollout, SamplingSettings, draw_seeds, position_ids_from_mask
from policies.checkpoints.seed_x import (AGENT_FILE, CONFIG_FILE, DETOKENIZER_FILE, NEGATIVE_FILE, TOKENIZER_DIR,
                                         is_kv_weight, load_released)
from policies.modules.seed_x import NUM_IMAGE_TOKENS, OutputResampler, ResamplerXLV2, SeedXConfig

log = logging.getLogger(__name__)

BOI, EOI = "<img>", "</img>"
RELEASED_VOCAB_SIZE = 32330
RELEASED_IDS = {"<img_00000>": 32000, BOI: 32100, EOI: 32101}
# Tokens that belong to images, patches and boxes: a plan may not write them (`<img>` ends a plan instead).
NON_TEXT_PREFIXES = ("<img_", "</img>", "<patch>", "</patch>", "<loc-", "<box_start>", "<box_end>")


def image_token(i: int) -> str:
    return f"<img_{i:05d}>"


def forced_logprobs(logits: Tensor, forced: Tensor) -> Tensor:
    """Log-probs [B, T] of `forced` [T] under the hard force: every other logit is -inf (so exactly 0)."""
    masked = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    index = forced.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    masked.scatter_(-1, index, logits.float().gather(-1, index))
    return torch.log_softmax(masked, dim=-1).gather(-1, index).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# The policy


class SeedXPolicy(Policy):
    name = "seed_x"
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    modules_to_save: list[str] = []  # the resamplers are regression heads, not part of the token policy
    free_image_tokens = False
    token_cfg = False  # its guidance is `guidance_scale`, in the diffusion de-tokenizer
    default_sampling = SamplingSettings()  # the image tokens are forced: nothing to set

    def __init__(self, llm, tokenizer, output_resampler: OutputResampler, resampler: ResamplerXLV2, unet, vae,
                 scheduler, negative_vit_embeds: Tensor, config: SeedXConfig, decode_batch_size: int = 4):
        self.model = llm
        self.tokenizer = tokenizer
        self.output_resampler = output_resampler
        self.resampler = resampler
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.negative_vit_embeds = negative_vit_embeds
        self.config = config
        self.decode_batch_size = decode_batch_size
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # LLaMA has none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.unk_token
        self.boi_id, self.eoi_id, image_ids = check_token_ids(tokenizer, llm.config.vocab_size)
        # the forced completion: <img_00000> .. <img_00063> </img>
        self.forced_ids = torch.tensor(image_ids + [self.eoi_id])
        self.num_image_tokens = len(self.forced_ids)
        self.image_size = config.image_size
        self._banned = sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(NON_TEXT_PREFIXES))
        self._negative = None  # (prompt_embeds [64, 2048], pooled [1280]) of the zero image, see _negative_branch

    def modules(self) -> list[nn.Module]:
        return [self.model, self.output_resampler, self.resampler, self.unet, self.vae]

    def to(self, device) -> "SeedXPolicy":
        super().to(device)
        self.negative_vit_embeds = self.negative_vit_embeds.to(device)
        self._negative = None
        return self

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model_name_or_path: str | None = None, tiny: bool = False, dtype: str = "float32", *,
              tokenizer_path: str | None = None, detokenizer_path: str | None = None, sdxl_path: str | None = None,
              negative_embeds_path: str | None = None, prompt_format: str | None = None,
              num_inference_steps: int | None = None, guidance_scale: float | None = None,
              image_size: int | None = None, decode_batch_size: int = 4, seed: int = 0) -> "SeedXPolicy":
        """The released layout (see the module docstring) from a local folder, or (`tiny=True`) the same
        architecture with random weights: tiny LLaMA, resamplers, SDXL-type UNet and VAE, 16 px, 2 Euler steps."""
        overrides = {k: v for k, v in dict(prompt_format=prompt_format, num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale, image_size=image_size).items()
                     if v is not None}
        if tiny:
            torch.manual_seed(seed)
            specials = [BOI, EOI] + [image_token(i) for i in range(NUM_IMAGE_TOKENS)] + ["[INST]", "[/INST]"]
            parts = toy.tiny_seed_x(specials, overrides)
        else:
            parts = load_released(model_name_or_path, tokenizer_path, detokenizer_path, sdxl_path,
                                  negative_embeds_path, overrides)
        policy = cls(**parts, decode_batch_size=decode_batch_size)
        torch_dtype = getattr(torch, dtype)
        if torch_dtype != torch.float32:
            for module in policy._modules():
                module.to(torch_dtype)
        return policy

    def save_pretrained(self, path: str) -> None:
        """Write the released layout (plus sdxl/, the negative features and our config) into one folder."""
        root = Path(path)
        self.model.save_pretrained(root / "llm")
        self.tokenizer.save_pretrained(root / TOKENIZER_DIR)
        (root / AGENT_FILE).parent.mkdir(parents=True, exist_ok=True)
        torch.save({f"output_resampler.{k}": v for k, v in self.output_resampler.state_dict().items()},
                   root / AGENT_FILE)
        detok = {f"resampler.{k}": v for k, v in self.resampler.state_dict().items()}
        detok.update({f"unet.{k}": v for k, v in self.unet.state_dict().items() if is_kv_weight(k)})
        (root / DETOKENIZER_FILE).parent.mkdir(parents=True, exist_ok=True)
        torch.save(detok, root / DETOKENIZER_FILE)
        self.unet.save_pretrained(root / "sdxl" / "unet")
        self.vae.save_pretrained(root / "sdxl" / "vae")
        self.scheduler.save_pretrained(root / "sdxl" / "scheduler")
        torch.save(self.negative_vit_embeds.cpu(), root / NEGATIVE_FILE)
        (root / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))

    # -- prompts and think-then-draw hooks ----------------------------------------------------------------------

    @property
    def plan_tokenizer(self):
        return self.tokenizer

    def plan_prompt_text(self, request: str) -> str:
        if self.config.prompt_format == "instruct":
            return f"[INST] {request} [/INST]\n"
        return request

    def format_prompt(self, prompt: str) -> str:
        request = f"Generate an image: {prompt}" if self.config.prompt_format == "instruct" else prompt
        return self.plan_prompt_text(request) + BOI

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        return self.model.lm_head(self.hidden_states(ids, mask, positions, cache))

    @property
    def decoder_stack(self) -> nn.Module:
        """The language model; its output is the final-layer hidden states after the final norm, as the release's
        hidden_states[-1]."""
        return self.model.model

    def image_logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)

    @property
    def image_prefix_ids(self) -> list[int]:
        return [self.boi_id]

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
        return self._banned

    def validate_for_training(self, train_image_tokens: bool = True) -> None:
        if self.plan is None or not self.plan.train_plan:
            raise ValueError(
                "seed_x has no trainable choice without think-then-draw: its 64 image tokens and </img> are forced, "
                "so the image is a deterministic function of the text before <img> (plus diffusion noise). Set "
                "`plan: true` and `train_plan: true` in the config to train the plan it writes first")
        super().validate_for_training(train_image_tokens)

    # -- sampling -----------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        batch = self.tokenizer([self.format_prompt(p) for p in prompts], padding=True, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _forced_forward(self, context_ids: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the forced image tokens after each context (which ends with `<img>`): the final-layer hidden states
        [B, 64, H] at the `<img_k>` inputs, and the log-probs [B, 65] of the forced tokens under the hard mask."""
        forced = self.forced_ids.to(context_ids.device)
        ids = torch.cat([context_ids, forced[:-1].expand(len(context_ids), -1)], dim=1)
        mask = torch.cat([context_mask, context_mask.new_ones(len(context_ids), len(forced) - 1)], dim=1)
        hidden = self.hidden_states(ids, mask, position_ids_from_mask(mask))
        start = context_ids.shape[1] - 1  # the hidden state at <img> predicts <img_00000>
        logits = self.image_logits(hidden[:, start:])
        return hidden[:, -NUM_IMAGE_TOKENS:].float(), forced_logprobs(logits, forced)

    def sample_image(self, ids: Tensor, mask: Tensor, repeats: int, settings: SamplingSettings,
                     generator: torch.Generator | None) -> ImageSample:
        """No decode loop: the image tokens are forced, so one forward per context gives their hidden states
        (without a plan: once per prompt), and `settings` shape nothing here (the plan has its own)."""
        hidden, logprobs = self._forced_forward(ids, mask)
        n = len(ids) * repeats
        tokens = self.forced_ids.to(self.device).expand(n, -1).clone()
        return ImageSample(tokens, torch.zeros_like(tokens, dtype=torch.bool),
                           logprobs.repeat_interleave(repeats, 0),
                           {"image_hidden": hidden.repeat_interleave(repeats, 0)})

    def rollout_extras(self, n: int, generator: torch.Generator | None) -> dict:
        """The diffusion noise of each sample, drawn here so that a rollout decodes reproducibly."""
        return {"noise_seed": draw_seeds(n, generator, self.device)}

    def score_image(self, rollout: Rollout, context_ids: Tensor, context_mask: Tensor, guided: bool,
                    return_entropy: bool, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """Exactly 0 (probability 1 under the hard mask, no gradient, zero entropy): no forward is spent on it."""
        zeros = torch.zeros(rollout.image_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
        return zeros, zeros.clone() if return_entropy else None

    # -- decoding -----------------------------------------------------------------------------------------------

    def _negative_branch(self) -> tuple[Tensor, Tensor]:
        """The de-tokenized zero-image features: computed once, they are a constant of the release."""
        if self._negative is None:
            with torch.no_grad():
                embeds, pooled = self.resampler(self.negative_vit_embeds[None].to(self._detok_dtype))
            self._negative = (embeds[0], pooled[0])
        return self._negative

    @property
    def _detok_dtype(self) -> torch.dtype:
        return next(self.resampler.parameters()).dtype

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        hidden = rollout.extras.get("image_hidden")
        if hidden is None:  # a rollout built elsewhere: recompute the features from its context
            hidden = self._forced_forward(*self.image_context(rollout))[0]
        seeds = rollout.extras.get("noise_seed")
        if seeds is None:
            raise ValueError("seed_x decode needs the rollout's extras['noise_seed'] (the rollout from sample())")
        images = []
        for start in range(0, len(rollout), self.decode_batch_size):
            chunk = slice(start, start + self.decode_batch_size)
            images.extend(self.detokenize(hidden[chunk], seeds[chunk].tolist()))
        return images

    def detokenize(self, hidden: Tensor, seeds: list[int]) -> list[Image.Image]:
        """LLM hidden states [B, 64, H] -> output resampler -> ResamplerXLV2 -> SDXL Euler denoise -> VAE -> PIL."""
        dtype, device = self._detok_dtype, hidden.device
        features = self.output_resampler(hidden.to(dtype))
        embeds, pooled = self.resampler(features)
        neg_embeds, neg_pooled = self._negative_branch()
        b, size = len(hidden), self.config.image_size
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        latent_shape = (self.unet.config.in_channels, size // scale, size // scale)
        noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        scheduler = self.scheduler
        scheduler.set_timesteps(self.config.num_inference_steps, device=device)
        latents = noise.to(device, torch.float32) * scheduler.init_noise_sigma
        guided = self.config.guidance_scale > 1.0
        cond = torch.cat([neg_embeds.expand(b, -1, -1), embeds]) if guided else embeds
        cond_pooled = torch.cat([neg_pooled.expand(b, -1), pooled]) if guided else pooled
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype).expand(len(cond), -1)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            noise_pred = self.unet(model_in.to(dtype), t, encoder_hidden_states=cond,
                                   added_cond_kwargs={"text_embeds": cond_pooled, "time_ids": time_ids}).sample.float()
            if guided:
                uncond, conditional = noise_pred.chunk(2)
                noise_pred = uncond + self.config.guidance_scale * (conditional - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        vae_dtype = next(self.vae.parameters()).dtype
        pixels = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype)).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]


# ----------------------------------------------------------------------------------------------------------------
# Checks and loading


def check_token_ids(tokenizer, vocab_size: int) -> tuple[int, int, list[int]]:
    """`<img>`, `</img>` and `<img_00000>`..`<img_00063>` must be distinct single tokens inside the LLM's
    vocabulary; with the released vocabulary size they must have the released ids."""
    names = [BOI, EOI] + [image_token(i) for i in range(NUM_IMAGE_TOKENS)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in names if t not in vocab]
    if missing:
        raise ValueError(f"SEED-X tokenizer lacks the image tokens {missing[:5]}{'...' if len(missing) > 5 else ''}")
    ids = [vocab[t] for t in names]
    if len(set(ids)) != len(ids) or max(ids) >= vocab_size:
        raise ValueError(f"SEED-X image token ids {ids[:3]}... are not distinct ids below the LLM's vocab {vocab_size}")
    if tokenizer(BOI, add_special_tokens=False)["input_ids"] != [ids[0]]:
        raise ValueError(f"{BOI!r} does not encode as the single token {ids[0]}")
    if vocab_size == RELEASED_VOCAB_SIZE:
        expected = [RELEASED_IDS[BOI], RELEASED_IDS[EOI]] + [RELEASED_IDS["<img_00000>"] + i
                                                              for i in range(NUM_IMAGE_TOKENS)]
        if ids != expected:
            raise ValueError(f"SEED-X ids differ from the release: <img>={ids[0]}, </img>={ids[1]}, "
                             f"<img_00000>={ids[2]} (expected 32100, 32101, 32000)")
    return ids[0], ids[1], ids[2:]


