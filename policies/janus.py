"""Janus-Pro (`deepseek-community/Janus-Pro-1B`, `-7B`) on transformers' `JanusForConditionalGeneration`.

Layout, as released: the SFT chat template ("<|User|>: {prompt}\\n\\n<|Assistant|>:", empty system prompt), then
`<begin_of_image>`, then 576 image tokens (24x24 grid, 384 px). Image tokens are raw VQ codebook ids (16384
codes); their logits come from `generation_head` (not the text `lm_head`), and a sampled code is fed back through
`generation_embeddings` + `generation_aligner`.

CFG as released: the unconditional row is the prompt with every token but BOS and BOI replaced by the pad token
(the pads stay attended: that is the null condition the model was trained with), and the guided logits are
u + s (c - u). Every image token is a free choice, so the action mask is all True.

Think-then-draw (policies/plan.py): the plan is the assistant's text after "<|Assistant|>:", written with the text
`lm_head`, and the image follows "...<|Assistant|>:{plan}<begin_of_image>". Its unconditional row blanks the plan
with the rest of the prompt (all pads but BOS/BOI), i.e. the released null condition.

One deliberate difference from `generate`: positions come from the attention mask (`cumsum - 1`), in sampling and
scoring alike, so left padding does not shift a prompt's positions and its samples do not depend on the batch.

Speed option (`build(..., static_cache=True, compile_decode=True)`): the decode loop runs on a preallocated
`StaticCache` and, on CUDA, a `torch.compile(mode="reduce-overhead")` (CUDA-graph) decode step, so that a step
costs its memory traffic rather than Python overhead. It samples the same distribution as the default path
(`_sample_image_static`; tested on CPU without compile). Compile is skipped on CPU, where it does not pay.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torch import Tensor
from trl.trainer.utils import selective_log_softmax

from policies.base import (
    CachedDecoder,
    CfgMode,
    Policy,
    Rollout,
    SamplingSettings,
    check_cfg_mode,
    entropy_of_logits,
    position_ids_from_mask,
    process_logits,
    sample_from_logits,
)
from policies.plan import ThinkThenDraw

# Renders the message format of transformers' Janus docs the way the released template does for one user turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


class JanusPolicy(ThinkThenDraw, Policy):
    name = "janus"
    # The SigLIP tower also has q/k/v_proj: restrict LoRA to the language model with a regex.
    lora_target_modules = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save = ["generation_head"]
    static_cache = False  # decode on a StaticCache (see _sample_image_static)
    compile_decode = False  # and, on CUDA, through a CUDA-graph compiled step

    def __init__(self, model, processor, decode_batch_size: int = 16):
        self.model = model
        self.processor = processor
        self.decode_batch_size = decode_batch_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.boi_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
        if None in (self.bos_id, self.pad_id, self.boi_id):
            raise ValueError("Janus tokenizer must define BOS, pad and <begin_of_image> tokens")
        self.num_image_tokens = model.config.vision_config.num_image_tokens
        self.grid = int(round(self.num_image_tokens**0.5))
        vq = model.config.vq_config
        self.image_size = self.grid * 2 ** (len(vq.channel_multiplier) - 1)

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_name_or_path: str | None = None,
        tiny: bool = False,
        dtype: str = "float32",
        device: str | None = None,
        decode_batch_size: int = 16,
        tiny_palette: list[str] | None = None,
        seed: int = 0,
        static_cache: bool = False,
        compile_decode: bool = False,
    ) -> "JanusPolicy":
        """Real weights by hub id or local path, or (`tiny=True`) the same architecture with random weights.

        `tiny_palette` (tiny only): fit the random VQ decoder for a few seconds so that code k paints
        `tiny_palette[k % len]` (the demo's toy world; see policies/tiny.py).
        `static_cache` / `compile_decode`: the fast decode loop of `_sample_image_static` (compile implies static).
        """
        from transformers import JanusForConditionalGeneration, JanusProcessor

        torch_dtype = getattr(torch, dtype)
        if tiny == (model_name_or_path is not None):
            raise ValueError("give exactly one of model_name_or_path=... or tiny=True")
        if tiny:
            torch.manual_seed(seed)
            model, processor = _tiny_janus()
            if tiny_palette:
                from policies.tiny import fit_decoder_to_palette

                vq = model.model.vqmodel
                fit_decoder_to_palette(vq.decode, vq.parameters(), vq.config.num_embeddings,
                                       int(model.config.vision_config.num_image_tokens**0.5), tiny_palette, seed=seed)
            model.to(torch_dtype)
        else:
            model = JanusForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch_dtype)
            processor = JanusProcessor.from_pretrained(model_name_or_path)
        model.requires_grad_(False)
        model.eval()
        policy = cls(model, processor, decode_batch_size=decode_batch_size)
        policy.static_cache, policy.compile_decode = static_cache or compile_decode, compile_decode
        if device is not None:
            policy.to(device)
        return policy

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    # -- prompts ------------------------------------------------------------------------------------------------

    def format_prompt(self, prompt: str) -> str:
        """The released SFT template (via the processor's chat template) followed by <begin_of_image>."""
        return self.plan_prompt_text(prompt) + self.processor.image_start_token

    # -- think-then-draw hooks (policies/plan.py): the plan is the assistant's text before <begin_of_image> ----

    @property
    def plan_tokenizer(self):
        return self.processor.tokenizer

    def plan_prompt_text(self, request: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": request}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"<|User|>: {request}\n\n<|Assistant|>:"

    def text_logits(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
        hidden = self._language_model(self.model.get_input_embeddings()(ids), mask, positions, cache)
        return self.model.lm_head(hidden.last_hidden_state)

    @property
    def image_prefix_ids(self) -> list[int]:
        return [self.boi_id]

    def plan_banned_ids(self) -> list[int]:
        tokenizer = self.processor.tokenizer
        return [tokenizer.convert_tokens_to_ids(t) for t in (self.processor.image_end_token,
                                                              self.processor.image_token)]

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        batch = self.processor.tokenizer([self.format_prompt(p) for p in prompts], padding=True,
                                         return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def unconditional_ids(self, prompt_ids: Tensor) -> Tensor:
        keep = (prompt_ids == self.bos_id) | (prompt_ids == self.boi_id)
        return prompt_ids.masked_fill(~keep, self.pad_id)

    # -- the AR model -------------------------------------------------------------------------------------------

    def _language_model(self, embeds: Tensor, mask: Tensor, positions: Tensor, cache=None):
        return self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=cache is not None,
        )

    def _guidance_rows(self, prompt_ids: Tensor, prompt_mask: Tensor, with_uncond: bool) -> tuple[Tensor, Tensor]:
        if not with_uncond:
            return prompt_ids, prompt_mask
        return torch.cat([prompt_ids, self.unconditional_ids(prompt_ids)]), prompt_mask.repeat(2, 1)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        group_size: int,
        *,
        cfg_scale: float = 5.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        settings = SamplingSettings(cfg_scale, temperature, top_k, top_p)
        contexts = self.image_contexts(prompts, group_size, generator)  # with a plan: prompt + plan + BOI
        tokens, logprobs = self._sample_image(contexts.ids, contexts.mask, contexts.repeats, settings, generator)
        return self.make_rollout(prompts, group_size, contexts.prompt_ids, contexts.prompt_mask, tokens,
                                 torch.ones_like(tokens, dtype=torch.bool), logprobs, settings, contexts.plan)

    def _sample_image(self, ids: Tensor, mask: Tensor, repeats: int, settings: SamplingSettings,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Image tokens after each context row, `repeats` samples per row (KV-cached, CFG)."""
        from transformers import DynamicCache

        if self.static_cache:
            return _sample_image_static(self, ids, mask, repeats, settings, generator)
        n = ids.shape[0] * repeats
        rows_ids, rows_mask = self._guidance_rows(ids, mask, settings.uses_cfg)

        def last_hidden(embeds, attn, positions, cache):
            return self._language_model(embeds, attn, positions, cache).last_hidden_state[:, -1]

        decoder = CachedDecoder(last_hidden, self.model.get_input_embeddings()(rows_ids), rows_mask, repeats,
                                DynamicCache(config=self.model.config.text_config))
        tokens = torch.empty(n, self.num_image_tokens, dtype=torch.long, device=self.device)
        logprobs = torch.empty(n, self.num_image_tokens, dtype=torch.float32, device=self.device)
        for t in range(self.num_image_tokens):
            logits = self.model.model.generation_head(decoder.last)
            uncond = logits[n:] if settings.uses_cfg else None
            tokens[:, t], logprobs[:, t] = sample_from_logits(process_logits(logits[:n], uncond, settings), generator)
            if t + 1 == self.num_image_tokens:
                break
            step_tokens = tokens[:, t : t + 1].repeat(2 if settings.uses_cfg else 1, 1)
            decoder.step(self.model.prepare_embeddings_for_image_generation(step_tokens))
        return tokens, logprobs

    def token_logprobs(self, rollout: Rollout, cfg_mode: CfgMode = "mixture", return_entropy: bool = False):
        check_cfg_mode(cfg_mode)
        settings = rollout.sampling
        with_uncond = cfg_mode == "mixture" and settings.uses_cfg
        context_ids, context_mask = self.image_context(rollout)
        rows_ids, rows_mask = self._guidance_rows(context_ids, context_mask, with_uncond)
        image_ids = rollout.image_ids
        previous = image_ids[:, :-1].repeat(2 if with_uncond else 1, 1)
        embeds = torch.cat([self.model.get_input_embeddings()(rows_ids),
                            self.model.prepare_embeddings_for_image_generation(previous)], dim=1)
        attn = torch.cat([rows_mask, rows_mask.new_ones(previous.shape)], dim=1)
        hidden = self._language_model(embeds, attn, position_ids_from_mask(attn)).last_hidden_state
        # hidden state at position P-1+t predicts image token t
        logits = self.model.model.generation_head(hidden[:, rows_ids.shape[1] - 1 :])
        n = len(rollout)
        processed = process_logits(logits[:n], logits[n:] if with_uncond else None, settings)
        logprobs = selective_log_softmax(processed, image_ids)
        entropy = entropy_of_logits(processed.detach()) if return_entropy else None
        return self.join_plan_logprobs(rollout, logprobs, entropy, return_entropy)

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        images = []
        for chunk in rollout.image_ids.split(self.decode_batch_size):
            pixels = self.model.decode_image_tokens(chunk)  # [B, H, W, 3], channels-last, about [-1, 1]
            pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            images.extend(Image.fromarray(p) for p in pixels)
        return images

# ----------------------------------------------------------------------------------------------------------------
# Fast decode loop: static KV cache, optionally a CUDA-graph compiled step. Kept apart from `_sample_image` on
# purpose; it must sample exactly what `_sample_image` samples (tests/test_benchmarks.py compares token for token).

log = logging.getLogger(__name__)


def _decode_step(policy: JanusPolicy, step_tokens: Tensor, attn: Tensor, positions: Tensor, cache) -> Tensor:
    """One image token for every row: embed the previous codes, run the LM one position, image-head logits."""
    embeds = policy.model.prepare_embeddings_for_image_generation(step_tokens)
    hidden = policy._language_model(embeds, attn, positions, cache).last_hidden_state[:, -1]
    return policy.model.model.generation_head(hidden)


def _decode_step_fn(policy: JanusPolicy):
    if not policy.compile_decode:
        return _decode_step
    if policy.device.type != "cuda":
        if not getattr(policy, "_warned_compile", False):
            log.warning("compile_decode needs CUDA; decoding eagerly on %s (static cache kept)", policy.device)
            policy._warned_compile = True
        return _decode_step
    if getattr(policy, "_compiled_step", None) is None:
        # reduce-overhead = CUDA graphs: shapes are fixed by the static cache and the full-length mask.
        policy._compiled_step = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=False)
    return policy._compiled_step


def _reusable_static_cache(policy: JanusPolicy, like: Tensor, max_cache_len: int):
    """One StaticCache per (rows, length, dtype), kept on the policy: its tensors are the static addresses a
    captured CUDA graph reads, so a new cache per rollout would force a new capture (and recompiles)."""
    from transformers import StaticCache

    key = (like.shape[0], max_cache_len, like.dtype, like.device)
    if getattr(policy, "_static_cache_key", None) != key:
        policy._static_cache = StaticCache(config=policy.model.config.text_config, max_cache_len=max_cache_len)
        policy._static_cache_key = key
    else:
        policy._static_cache.reset()  # zeros the tensors in place and rewinds the length
    return policy._static_cache


@torch.no_grad()
def _sample_image_static(policy: JanusPolicy, ids: Tensor, mask: Tensor, repeats: int, settings: SamplingSettings,
                         generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`JanusPolicy._sample_image` on a StaticCache: prefill each context row once (dynamic cache), repeat it
    `repeats` times into a preallocated [rows, heads, P + T, d] cache, then decode with fixed shapes (full-length
    attention mask updated in place), which is what lets a compiled step be replayed as one CUDA graph."""
    from transformers import DynamicCache

    n, num_tokens = ids.shape[0] * repeats, policy.num_image_tokens
    rows_ids, rows_mask = policy._guidance_rows(ids, mask, settings.uses_cfg)
    prompt_len = rows_ids.shape[1]

    prefill = DynamicCache(config=policy.model.config.text_config)
    positions = position_ids_from_mask(rows_mask)
    out = policy._language_model(policy.model.get_input_embeddings()(rows_ids), rows_mask, positions, prefill)
    if repeats > 1:
        prefill.batch_repeat_interleave(repeats)
    cache = _reusable_static_cache(policy, prefill.layers[0].keys, prompt_len + num_tokens)
    for static_layer, layer in zip(cache.layers, prefill.layers):
        if not static_layer.is_initialized:
            static_layer.lazy_initialization(layer.keys, layer.values)
        static_layer.keys[:, :, :prompt_len] = layer.keys
        static_layer.values[:, :, :prompt_len] = layer.values
        static_layer.cumulative_length.fill_(prompt_len)
    del prefill

    hidden = out.last_hidden_state[:, -1].repeat_interleave(repeats, 0)
    logits = policy.model.model.generation_head(hidden)
    attn = torch.zeros(hidden.shape[0], prompt_len + num_tokens, dtype=rows_mask.dtype, device=policy.device)
    attn[:, :prompt_len] = rows_mask.repeat_interleave(repeats, 0)
    next_position = positions[:, -1:].repeat_interleave(repeats, 0) + 1
    step = _decode_step_fn(policy)

    tokens = torch.empty(n, num_tokens, dtype=torch.long, device=policy.device)
    logprobs = torch.empty(n, num_tokens, dtype=torch.float32, device=policy.device)
    for t in range(num_tokens):
        uncond = logits[n:] if settings.uses_cfg else None
        tokens[:, t], logprobs[:, t] = sample_from_logits(process_logits(logits[:n], uncond, settings), generator)
        if t + 1 == num_tokens:
            break
        step_tokens = tokens[:, t : t + 1].repeat(2 if settings.uses_cfg else 1, 1)
        attn[:, prompt_len + t] = 1
        # clone: a CUDA-graph replay overwrites its output buffer on the next call
        logits = step(policy, step_tokens, attn, next_position, cache).clone()
        next_position = next_position + 1
    return tokens, logprobs


def _tiny_janus():
    """A ~0.5M-parameter JanusForConditionalGeneration: 64 image tokens (8x8), 256 codes, 32 px images."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    from policies.tiny import word_level_tokenizer

    specials = ["<begin_of_image>", "<end_of_image>", "<image_placeholder>", "<|User|>:", "<|Assistant|>:"]
    tokenizer = word_level_tokenizer(
        specials,
        extra_special={"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_placeholder>"},
    )
    hidden, patches = 64, 8
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=patches * 4,
                           patch_size=4, num_image_tokens=patches * patches, projection_dim=hidden, mlp_ratio=2,
                           depth=1),
        vq_config=dict(embed_dim=8, num_embeddings=256, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1], num_res_blocks=1, projection_dim=hidden,
                       image_token_embed_dim=hidden, num_hidden_layers=2),
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
    )
    model = JanusForConditionalGeneration(config)
    image_processor = JanusImageProcessor(size={"height": patches * 4, "width": patches * 4})
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=TINY_CHAT_TEMPLATE, num_image_tokens=patches * patches)
    return model, processor
