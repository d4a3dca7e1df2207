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
  perceiver layers of 16 x 64 heads; inputs `F.normalize`d over dim 1 as released) -> SDXL `prompt_embeds`
  (64 x 2048 = 768 + 1280) and `pooled_prompt_embeds` (1280) in place of both text encoders; diffusers' SDXL UNet
  (base weights, with the released fine-tuned `to_k`/`to_v`), Euler (SDXL scheduler config), guidance 7.5, 30 steps,
  1024 px, time ids (H, W, 0, 0, H, W).
- Negative branch: the release runs the Qwen-VL ViT-G on an all-zero 448 px image (pooled 4x to 64 x 4096) and
  de-tokenizes that. It is a constant: we store those 64 x 4096 features once (`negative_image_embeds.pt`) and push
  them through the resampler at load time, instead of running the 1.9B vision tower every rollout.

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
    negative_image_embeds.pt (or `negative_embeds_path`)  [64, 4096] ViT-G features of the zero image
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
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from policies.base import ImageSample, Policy, Rollout, SamplingSettings, draw_seeds, position_ids_from_mask

log = logging.getLogger(__name__)

BOI, EOI = "<img>", "</img>"
NUM_IMAGE_TOKENS = 64
RELEASED_VOCAB_SIZE = 32330
RELEASED_IDS = {"<img_00000>": 32000, BOI: 32100, EOI: 32101}
TOKENIZER_DIR = "cvlm_llama2_tokenizer_100img_and_224loc_addpatch"
DETOKENIZER_FILE = "seed_detokenizer/first_stage/pytorch_model.bin"
AGENT_FILE = "agent/pytorch_model.bin"
NEGATIVE_FILE = "negative_image_embeds.pt"
CONFIG_FILE = "seed_x_policy.json"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
# Tokens that belong to images, patches and boxes: a plan may not write them (`<img>` ends a plan instead).
NON_TEXT_PREFIXES = ("<img_", "</img>", "<patch>", "</patch>", "<loc-", "<box_start>", "<box_end>")


def image_token(i: int) -> str:
    return f"<img_{i:05d}>"


@dataclass
class SeedXConfig:
    """Module sizes and decode settings; the defaults are the release's."""

    output_resampler_dim: int = 4096
    output_resampler_heads: int = 32
    detokenizer_dim: int = 1024
    detokenizer_depth: int = 4
    detokenizer_dim_head: int = 64
    detokenizer_heads: int = 16
    prompt_dim_1: int = 768  # CLIP-L part of SDXL's prompt_embeds
    prompt_dim_2: int = 1280  # OpenCLIP-G part, also the pooled size
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    image_size: int = 1024
    prompt_format: str = "instruct"

    def __post_init__(self) -> None:
        if self.prompt_format not in ("instruct", "caption"):
            raise ValueError(f"prompt_format must be 'instruct' or 'caption', got {self.prompt_format!r}")


# ----------------------------------------------------------------------------------------------------------------
# Resamplers (our code, the release's parameter names so that its state dicts load as they are)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions [grid*grid, dim]: first half the column index, second the row (MAE / Qwen-VL
    layout). Only an initial value: the released state dict carries them as `pos_embed`."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return torch.from_numpy(np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)).float()


class OutputResampler(nn.Module):
    """One cross-attention layer: `num_queries` learned queries over the LLM's 64 hidden states."""

    def __init__(self, embed_dim: int, num_heads: int, kv_dim: int, num_queries: int = NUM_IMAGE_TOKENS):
        super().__init__()
        grid = int(math.isqrt(num_queries))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, 64, kv_dim] -> [B, Q, embed_dim]
        if x.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(f"output resampler expects {self.pos_embed.shape[0]} hidden states, got {x.shape[1]}")
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(q, x + self.pos_embed, x, need_weights=False)[0]


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        split = lambda t: t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(latents))
        k, v = (split(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        weight = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(self.dim_head), dim=-1).to(q.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


class AttentionPool(nn.Module):
    """Attention pooling of the latents into one vector (query: their mean), for SDXL's pooled embedding."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        b, n, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(b, d))


class ResamplerXLV2(nn.Module):
    """The de-tokenizer's perceiver resampler: 64 x 4096 image features -> SDXL (prompt_embeds, pooled)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output1_dim: int, output2_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                         nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))
        self.unet_proj_1 = nn.Linear(dim, output1_dim)
        self.unet_proj_2 = nn.Linear(dim, output2_dim)
        self.unet_attnpool = AttentionPool(num_queries, dim, heads, output2_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(F.normalize(x))  # dim=1 (over the 64 tokens), as released
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        hidden = self.norm_out(latents)
        prompt_embeds = torch.cat([self.unet_proj_1(hidden), self.unet_proj_2(hidden)], dim=-1)
        return prompt_embeds, self.unet_attnpool(hidden)


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
        for module in self._modules():
            module.requires_grad_(False)
            module.eval()

    def _modules(self) -> list[nn.Module]:
        return [self.model, self.output_resampler, self.resampler, self.unet, self.vae]

    def to(self, device) -> "SeedXPolicy":
        for module in self._modules():
            module.to(device)
        self.negative_vit_embeds = self.negative_vit_embeds.to(device)
        self._negative = None
        return self

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_name_or_path: str | None = None,
        tiny: bool = False,
        dtype: str = "float32",
        device: str | None = None,
        tokenizer_path: str | None = None,
        detokenizer_path: str | None = None,
        sdxl_path: str | None = None,
        negative_embeds_path: str | None = None,
        prompt_format: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_size: int | None = None,
        decode_batch_size: int = 4,
        seed: int = 0,
    ) -> "SeedXPolicy":
        """The released layout (see the module docstring) from a local folder, or (`tiny=True`) the same
        architecture with random weights: tiny LLaMA, resamplers, SDXL-type UNet and VAE, 16 px, 2 Euler steps."""
        if tiny == (model_name_or_path is not None):
            raise ValueError("give exactly one of model_name_or_path=... or tiny=True")
        overrides = {k: v for k, v in dict(prompt_format=prompt_format, num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale, image_size=image_size).items()
                     if v is not None}
        if tiny:
            torch.manual_seed(seed)
            parts = _tiny_parts(overrides)
        else:
            parts = load_released(model_name_or_path, tokenizer_path, detokenizer_path, sdxl_path,
                                  negative_embeds_path, overrides)
        policy = cls(**parts, decode_batch_size=decode_batch_size)
        torch_dtype = getattr(torch, dtype)
        if torch_dtype != torch.float32:
            for module in policy._modules():
                module.to(torch_dtype)
        if device is not None:
            policy.to(device)
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
        detok.update({f"unet.{k}": v for k, v in self.unet.state_dict().items() if _is_kv_weight(k)})
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
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=cache is not None).logits

    def hidden_states(self, inputs: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        """Final-layer hidden states (after the final norm, as the release's hidden_states[-1])."""
        return self.model.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None).last_hidden_state

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
                    return_entropy: bool) -> tuple[Tensor, Tensor | None]:
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


def _is_kv_weight(key: str) -> bool:
    return key.endswith(("to_k.weight", "to_v.weight"))


def _find(root: Path, relative: str) -> Path | None:
    for base in (root, root.parent):
        if (base / relative).exists():
            return base / relative
    return None


def load_released(model_path: str, tokenizer_path: str | None, detokenizer_path: str | None, sdxl_path: str | None,
                  negative_embeds_path: str | None, overrides: dict) -> dict:
    """The pieces of `SeedXPolicy.__init__` from the released layout; every missing piece is named at once."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, LlamaForCausalLM

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
        "pooled to 64 x 4096)": Path(negative_embeds_path) if negative_embeds_path else _find(root, NEGATIVE_FILE),
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
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    output_resampler = OutputResampler(config.output_resampler_dim, config.output_resampler_heads,
                                       llm.config.hidden_size)
    _load_prefixed(output_resampler, torch.load(agent_file, map_location="cpu", weights_only=True),
                   "output_resampler.", agent_file)

    detok = torch.load(detok_file, map_location="cpu", weights_only=True)
    resampler = ResamplerXLV2(config.detokenizer_dim, config.detokenizer_depth, config.detokenizer_dim_head,
                              config.detokenizer_heads, NUM_IMAGE_TOKENS, config.output_resampler_dim,
                              config.prompt_dim_1, config.prompt_dim_2)
    _load_prefixed(resampler, detok, "resampler.", detok_file)

    sdxl = sdxl_path or (str(root / "sdxl") if (root / "sdxl").is_dir() else SDXL_BASE)
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sdxl, subfolder="vae")
    scheduler = EulerDiscreteScheduler.from_pretrained(sdxl, subfolder="scheduler")
    unet_weights = {k[len("unet."):]: v for k, v in detok.items() if k.startswith("unet.")}
    unet_keys = set(unet.state_dict())
    unexpected = sorted(set(unet_weights) - unet_keys)
    missing_kv = sorted(k for k in unet_keys if _is_kv_weight(k) and k not in unet_weights)
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


def _load_prefixed(module: nn.Module, state: dict, prefix: str, source: Path) -> None:
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: keys under {prefix!r} do not match: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")
    module.load_state_dict(weights)


def _tiny_parts(overrides: dict) -> dict:
    """A tiny SEED-X of the real architectures: 2-layer LLaMA (hidden 64), the two resamplers, an SDXL-type UNet
    (text_time conditioning), a 2-block VAE; 16 px images in 2 Euler steps."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from policies.tiny import word_level_tokenizer

    specials = [BOI, EOI] + [image_token(i) for i in range(NUM_IMAGE_TOKENS)] + ["[INST]", "[/INST]"]
    tokenizer = word_level_tokenizer(specials)
    hidden = 64
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.2))
    config = SeedXConfig(output_resampler_dim=32, output_resampler_heads=4, detokenizer_dim=32, detokenizer_depth=1,
                         detokenizer_dim_head=8, detokenizer_heads=4, prompt_dim_1=8, prompt_dim_2=16,
                         num_inference_steps=2, image_size=16, **overrides)
    output_resampler = OutputResampler(config.output_resampler_dim, config.output_resampler_heads, hidden)
    resampler = ResamplerXLV2(config.detokenizer_dim, config.detokenizer_depth, config.detokenizer_dim_head,
                              config.detokenizer_heads, NUM_IMAGE_TOKENS, config.output_resampler_dim,
                              config.prompt_dim_1, config.prompt_dim_2)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=config.prompt_dim_1 + config.prompt_dim_2, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + config.prompt_dim_2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, sample_size=16, scaling_factor=0.13025)
    # SDXL base's scheduler config
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    negative = torch.randn(NUM_IMAGE_TOKENS, config.output_resampler_dim)
    return dict(llm=llm, tokenizer=tokenizer, output_resampler=output_resampler, resampler=resampler, unet=unet,
                vae=vae, scheduler=scheduler, negative_vit_embeds=negative, config=config)
