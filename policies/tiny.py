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
from tqdm.auto import tqdm
from diffusers import AutoencoderDC, AutoencoderKL, EulerDiscreteScheduler, SanaTransformer2DModel, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, Emu3Config, Emu3ForConditionalGeneration,
                          Emu3ImageProcessor, Emu3Processor, JanusConfig, JanusForConditionalGeneration,
                          JanusImageProcessor, JanusProcessor, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen3Config, Qwen3ForCausalLM)

from policies.modules.sana_decoder import DiffusionDecoder, build_connector
from policies.modules.seed_x import NUM_IMAGE_TOKENS, OutputResampler, ResamplerXLV2, SeedXConfig
from rewards.palette import COLORS

# Words the tiny tokenizers know; anything else maps to <unk>.
TINY_WORDS = (
    "a an the of on in with and image picture photo painting drawing plain colour color solid background "
    "dog cat car tree house apple sign that says text above below left right next to two three four "
    + " ".join(COLORS)
).split()


# Chat templates that render the message format of each release's template for one user turn.
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
# Weight init of the tiny Emu3 text model. With the default 0.02 the visual rows of a random lm_head are so short that
# no hidden state (RMS-normed) can favour one colour's codes by more than ~0.1 nat: LoRA-only GRPO has nothing to move.
EMU3_INIT_STD = 0.2


def word_level_tokenizer(special_tokens: list[str], words: Iterable[str] = TINY_WORDS, bos: str = "<s>",
                         unk: str = "<unk>", pad: str = "<pad>", eos: str = "</s>", extra_special: dict | None = None):
    """A PreTrainedTokenizerFast over a fixed word list that adds BOS, pads on the left and needs no download."""
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
    GroupNorms see other statistics), so a policy that learns to paint one colour would get no credit. Returns the
    final mean squared error (pixels in [-1, 1]).
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
    for _ in tqdm(range(steps), desc="fitting the toy decoder to the palette", unit="step", leave=False):
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


# ----------------------------------------------------------------------------------------------------------------
# Tiny models of each family's architectures (random weights; the family's build(tiny=True) wraps them)


def tiny_janus():
    """A ~0.5M-parameter JanusForConditionalGeneration: 64 image tokens (8x8), 256 codes, 32 px images."""
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
                               chat_template=JANUS_CHAT_TEMPLATE, num_image_tokens=patches * patches)
    return model, processor


def tiny_emu3(eol_token: str, eof_token: str, codes: int = 256, text: dict | None = None):
    """A tiny Emu3ForConditionalGeneration (~0.35M parameters), 256 codes.

    Its VQ decoder upsamples by 2 (the release: 8), so the tiny default grid of 4x4 (resolution 32) decodes to 8 px
    images: a deeper decoder makes the palette fit (tiny_palette) several times slower. `codes` and `text` (text
    config values) make larger random models of the same architecture for the benchmarks.
    """
    visual = [f"<|visual token {k:06d}|>" for k in range(codes)]
    specials = [eol_token, eof_token, "<|image start|>", "<|image end|>", "<|image token|>", "<image>",
                *"0123456789*", *visual]
    tokenizer = word_level_tokenizer(
        specials, bos="<|extra_203|>", eos="<|extra_204|>", pad="<|endoftext|>",
        extra_special={"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                       "image_wrapper_token": "<|image token|>", "eof_token": eof_token},
    )
    # The released (GPT-style) tokenizer adds no BOS; Emu3Processor writes it into the text.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    config = Emu3Config(
        text_config={**dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
                            initializer_range=EMU3_INIT_STD,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id), **(text or {})},
        vq_config=dict(codebook_size=codes, embed_dim=4, latent_channels=4, base_channels=32, hidden_size=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
                       temporal_downsample_factor=1),
        vocabulary_map=tokenizer.get_vocab(),
        initializer_range=EMU3_INIT_STD,
    )
    model = Emu3ForConditionalGeneration(config)
    processor = Emu3Processor(image_processor=Emu3ImageProcessor(), tokenizer=tokenizer)
    return model, processor


def tiny_chameleon(specials: list[str], image_token_names: list[str], extra_special: dict,
                   text: dict | None = None, resolution: int = 32):
    """A ~0.3M-parameter ChameleonForConditionalGeneration: 64 image tokens (8x8 grid), 256 codes, 32 px images.
    `num_res_blocks=0` (one resnet block per decoder level) keeps the demo's palette fit short.

    The vocabulary holds the release's special tokens and IMGIMG names; `vocabulary_map` is the tokenizer's vocab,
    as in transformers' conversion of the release. `text` (config values) and `resolution` (the VQ image side; the
    grid is resolution / 4) make larger random models of the same architecture for the benchmarks.
    """
    num_codes = len(image_token_names)
    tokenizer = word_level_tokenizer(specials, words=list(TINY_WORDS) + image_token_names, extra_special=extra_special)
    dims = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4), **(text or {})}
    config = ChameleonConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocabulary_map=dict(tokenizer.get_vocab()),
        vq_config=dict(embed_dim=16, num_embeddings=num_codes, latent_channels=16, resolution=resolution,
                       base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=0),
        **dims,
    )
    return ChameleonForConditionalGeneration(config), tokenizer


def tiny_blip3o_next():
    """Random tiny Qwen3 + Sana + DC-AE: 16 image tokens (4x4) from 64 codes, 8x8x8 latents, 32 px images."""
    codes, grid = 64, 4
    image_tokens = [f"<I{k}>" for k in range(codes)]
    specials = ["<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>", "<S0>", "<S1>", "<S2>", *image_tokens]
    words = [*TINY_WORDS, "system", "user", "assistant", *"you are helpful assistant please generate based "
             "following caption :".split()]
    tokenizer = word_level_tokenizer(specials, words=words)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
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


def fit_diffusion_decoder_to_palette(policy, colors: list[str], steps: int = 80, lr: float = 5e-3,
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
        for _ in tqdm(range(steps), desc="fitting the toy diffusion decoder to the palette", unit="step",
                      leave=False):
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


def tiny_seed_x(specials: list[str], overrides: dict) -> dict:
    """A tiny SEED-X of the real architectures: 2-layer LLaMA (hidden 64), the two resamplers, an SDXL-type UNet
    (text_time conditioning), a 2-block VAE; 16 px images in 2 Euler steps."""
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
                              config.prompt_dim_1, config.prompt_dim_2,
                              normalize=config.detokenizer_normalize)
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
