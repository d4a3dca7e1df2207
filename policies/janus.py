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

Pixels as released (`generation_inference.py`): (x + 1) / 2 * 255 in float32, clipped, truncated to uint8.

Sampling defaults (`default_sampling`) as released: CFG weight 5, temperature 1, the full codebook (no top-k/top-p).
The decode loop and its speed options (`static_cache`, `compile_decode`) are the engine's (policies/base.py).
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor, nn

from policies import tiny as toy
from policies.base import Policy, Rollout, SamplingSettings, truncated_pixels

RELEASE_PAD_TOKEN = "<｜▁pad▁｜>"  # the release's pad token (DeepSeek tokenizer), named so in its processor


class JanusPolicy(Policy):
    name = "janus"
    # The SigLIP tower also has q/k/v_proj: restrict LoRA to the language model with a regex.
    lora_target_modules = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    modules_to_save = ["generation_head"]
    # As released (deepseek-ai/Janus generation_inference.py): cfg_weight 5, temperature 1, no truncation.
    default_sampling = SamplingSettings(cfg_scale=5.0, temperature=1.0)
    stack_takes_embeds = True  # image tokens come back through generation_embeddings + aligner

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
        # The release blanks the unconditional row with this token by name; the tokenizer's pad must be the same.
        release_pad = tokenizer.get_vocab().get(RELEASE_PAD_TOKEN)
        if release_pad is not None and release_pad != self.pad_id:
            raise ValueError(f"Janus tokenizer: pad token {tokenizer.pad_token!r} (id {self.pad_id}) is not the "
                             f"release's {RELEASE_PAD_TOKEN!r} (id {release_pad}), which the unconditional CFG row "
                             "is made of; set tokenizer.pad_token to it")
        self.num_image_tokens = model.config.vision_config.num_image_tokens
        self.grid = int(round(self.num_image_tokens**0.5))
        vq = model.config.vq_config
        self.image_size = self.grid * 2 ** (len(vq.channel_multiplier) - 1)

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, model_name_or_path: str | None = None, tiny: bool = False, dtype: str = "float32", *,
              decode_batch_size: int = 16, tiny_palette: list[str] | None = None, seed: int = 0) -> "JanusPolicy":
        """Real weights by hub id or local path, or (`tiny=True`) the same architecture with random weights.

        `tiny_palette` (tiny only): fit the random VQ decoder for a few seconds so that code k paints
        `tiny_palette[k % len]` (the demo's toy world; see policies/tiny.py).
        """
        from transformers import JanusForConditionalGeneration, JanusProcessor

        torch_dtype = getattr(torch, dtype)
        if tiny:
            torch.manual_seed(seed)
            model, processor = toy.tiny_janus()
            if tiny_palette:
                vq = model.model.vqmodel
                toy.fit_decoder_to_palette(vq.decode, vq.parameters(), vq.config.num_embeddings,
                                       int(model.config.vision_config.num_image_tokens**0.5), tiny_palette, seed=seed)
            model.to(torch_dtype)
        else:
            model = JanusForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch_dtype)
            processor = JanusProcessor.from_pretrained(model_name_or_path)
        policy = cls(model, processor, decode_batch_size=decode_batch_size)
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
        return self.model.lm_head(self.hidden_states(self.context_inputs(ids), mask, positions, cache))

    @property
    def image_prefix_ids(self) -> list[int]:
        return [self.boi_id]

    def plan_banned_ids(self, end_marker_id: int) -> list[int]:
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

    # -- the engine's hooks (policies/base.py) ------------------------------------------------------------------

    @property
    def cache_config(self):
        return self.model.config.text_config

    @property
    def decoder_stack(self) -> nn.Module:
        """The language model (fed embeddings: prompt embeddings, then image-token embeddings)."""
        return self.model.model.language_model

    def context_inputs(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def image_inputs(self, tokens: Tensor) -> Tensor:
        """A drawn code is fed back through `generation_embeddings` + `generation_aligner`."""
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def image_logits(self, hidden: Tensor) -> Tensor:
        return self.model.model.generation_head(hidden)

    def guidance_rows(self, ids: Tensor, mask: Tensor, guided: bool) -> tuple[Tensor, Tensor]:
        if not guided:
            return ids, mask
        return torch.cat([ids, self.unconditional_ids(ids)]), mask.repeat(2, 1)

    @torch.no_grad()
    def decode(self, rollout: Rollout) -> list[Image.Image]:
        images = []
        for chunk in rollout.image_ids.split(self.decode_batch_size):
            pixels = self.model.decode_image_tokens(chunk)  # [B, H, W, 3], channels-last, about [-1, 1]
            pixels = truncated_pixels(pixels).cpu().numpy()  # the release truncates (generation_inference.py)
            images.extend(Image.fromarray(p) for p in pixels)
        return images

