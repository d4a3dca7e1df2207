"""SEED-X: forced image tokens, the hidden-state -> resampler -> SDXL path on the tiny model, the released-layout
loader, and the trainer's refusal to run without a plan."""

import json

import pytest
import torch
from PIL import Image

import policies
from conftest import PROMPTS
from policies.plan import PlanSettings
from policies.seed_x import (AGENT_FILE, DETOKENIZER_FILE, NEGATIVE_FILE, NUM_IMAGE_TOKENS, TOKENIZER_DIR,
                             check_token_ids, forced_logprobs, image_token)


@pytest.fixture(scope="module")
def seed_x():
    return policies.build("seed_x", tiny=True)


def test_image_tokens_are_forced_with_a_hard_mask(seed_x):
    rollout = seed_x.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    tok = seed_x.tokenizer
    expected = tok.convert_tokens_to_ids([image_token(i) for i in range(NUM_IMAGE_TOKENS)] + ["</img>"])
    assert rollout.completion_ids.tolist() == [expected] * 4
    assert not rollout.action_mask.any()
    assert torch.equal(rollout.logprobs, torch.zeros_like(rollout.logprobs))  # computed from the real logits
    assert (rollout.prompt_ids[:, -1] == tok.convert_tokens_to_ids("<img>")).all()
    # hard, not soft: even a forced token whose logit is far below the others gets probability 1
    logits = torch.randn(2, 3, 50)
    logits[:, :, 7] = -1e4
    assert torch.equal(forced_logprobs(logits, torch.tensor([7, 1, 2])), torch.zeros(2, 3))


def test_hidden_states_are_the_last_layer_at_the_image_token_inputs(seed_x):
    """The stored features equal an unbatched plain forward over `prompt <img> <img_00000>..<img_00063>`."""
    rollout = seed_x.sample(PROMPTS, 1, generator=torch.Generator().manual_seed(0))
    assert (rollout.prompt_mask[0] == 0).any()  # row 0 was left-padded in the batch
    for row, prompt in enumerate(PROMPTS):
        ids = seed_x.tokenizer(seed_x.format_prompt(prompt), return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, rollout.completion_ids[row : row + 1, :NUM_IMAGE_TOKENS]], dim=1)
        with torch.no_grad():
            hidden = seed_x.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(rollout.extras["image_hidden"][row], hidden[0, -NUM_IMAGE_TOKENS:], atol=1e-4)


def test_whole_path_to_pil_images(seed_x):
    """Hidden states -> output resampler -> ResamplerXLV2 -> 2-step SDXL Euler denoise with CFG -> VAE -> PIL."""
    rollout = seed_x.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    features = seed_x.output_resampler(rollout.extras["image_hidden"])
    assert features.shape == (4, NUM_IMAGE_TOKENS, seed_x.config.output_resampler_dim)
    embeds, pooled = seed_x.resampler(features)
    assert embeds.shape == (4, NUM_IMAGE_TOKENS, seed_x.config.prompt_dim_1 + seed_x.config.prompt_dim_2)
    assert pooled.shape == (4, seed_x.config.prompt_dim_2)
    assert not torch.allclose(embeds[0], embeds[2])  # the two prompts condition differently
    # the negative branch is the constant zero-image features through the resampler, computed once
    negative = seed_x._negative_branch()
    assert seed_x._negative_branch() is negative
    assert torch.allclose(negative[0], seed_x.resampler(seed_x.negative_vit_embeds[None])[0][0])

    images = seed_x.decode(rollout)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    assert all(im.size == (seed_x.image_size, seed_x.image_size) for im in images)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in seed_x.decode(rollout)]  # seeded noise
    # same prompt, same forced tokens: only the diffusion noise differs within a group
    assert images[0].tobytes() != images[1].tobytes()
    same_noise = rollout.select(torch.tensor([0, 2]))
    same_noise.extras["noise_seed"] = same_noise.extras["noise_seed"][:1].repeat(2)
    a, b = seed_x.decode(same_noise)
    assert a.tobytes() != b.tobytes()  # ...and the prompt changes the image through the hidden states


def test_released_layout_loads_through_the_real_loader(seed_x, tmp_path):
    seed_x.save_pretrained(str(tmp_path))
    for relative in ("llm/config.json", AGENT_FILE, DETOKENIZER_FILE, TOKENIZER_DIR, NEGATIVE_FILE,
                     "sdxl/unet/config.json", "sdxl/vae/config.json", "sdxl/scheduler/scheduler_config.json"):
        assert (tmp_path / relative).exists(), relative
    agent = torch.load(tmp_path / AGENT_FILE, weights_only=True)
    assert all(k.startswith("output_resampler.") for k in agent) and "output_resampler.query" in agent
    detok = torch.load(tmp_path / DETOKENIZER_FILE, weights_only=True)
    assert any(k.startswith("resampler.layers.0.0.to_kv") for k in detok)
    assert detok and all(k.startswith("resampler.") or k.endswith(("to_k.weight", "to_v.weight")) for k in detok)

    # the variant folder holds llm/ and agent/; the shared pieces are found in its parent, as released
    variant = tmp_path / "seed_x_i"
    variant.mkdir()
    (tmp_path / "llm").rename(variant / "llm")
    (tmp_path / "agent").rename(variant / "agent")
    loaded = policies.build("seed_x", model_name_or_path=str(variant), sdxl_path=str(tmp_path / "sdxl"))
    rollout = seed_x.sample(PROMPTS, 1, generator=torch.Generator().manual_seed(1))
    again = loaded.sample(PROMPTS, 1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rollout.extras["image_hidden"], again.extras["image_hidden"], atol=1e-6)
    assert [im.tobytes() for im in seed_x.decode(rollout)] == [im.tobytes() for im in loaded.decode(rollout)]

    # the released fine-tuned to_k/to_v replace the SDXL base ones
    key = next(k for k in detok if k.startswith("unet."))
    with torch.no_grad():
        detok[key] = detok[key] + 1.0
    torch.save(detok, tmp_path / DETOKENIZER_FILE)
    changed = policies.build("seed_x", model_name_or_path=str(variant), sdxl_path=str(tmp_path / "sdxl"))
    assert torch.equal(changed.unet.state_dict()[key[len("unet."):]], detok[key])


def test_missing_pieces_and_keys_are_named(seed_x, tmp_path):
    seed_x.save_pretrained(str(tmp_path))
    (tmp_path / AGENT_FILE).unlink()
    (tmp_path / NEGATIVE_FILE).unlink()
    with pytest.raises(FileNotFoundError) as error:
        policies.build("seed_x", model_name_or_path=str(tmp_path))
    assert "agent/pytorch_model.bin" in str(error.value) and NEGATIVE_FILE in str(error.value)
    assert "llm" not in str(error.value).split("missing:")[1]

    seed_x.save_pretrained(str(tmp_path))
    agent = torch.load(tmp_path / AGENT_FILE, weights_only=True)
    del agent["output_resampler.kv_proj.weight"]
    torch.save(agent, tmp_path / AGENT_FILE)
    with pytest.raises(ValueError, match="missing \\['kv_proj.weight'\\]"):
        policies.build("seed_x", model_name_or_path=str(tmp_path))

    seed_x.save_pretrained(str(tmp_path))
    detok = torch.load(tmp_path / DETOKENIZER_FILE, weights_only=True)
    torch.save({k: v for k, v in detok.items() if not k.endswith("to_v.weight")}, tmp_path / DETOKENIZER_FILE)
    with pytest.raises(ValueError, match="missing fine-tuned to_k/to_v"):
        policies.build("seed_x", model_name_or_path=str(tmp_path))


def test_token_ids_are_checked(seed_x):
    # the tiny vocabulary has the tokens but not at the released ids: with the released vocab size that is an error
    with pytest.raises(ValueError, match="differ from the release"):
        check_token_ids(seed_x.tokenizer, 32330)
    with pytest.raises(ValueError, match="below the LLM's vocab"):
        check_token_ids(seed_x.tokenizer, 10)


def test_trainer_refuses_seed_x_without_a_plan():
    from grpo_img.config import load_config
    from grpo_img.trainer import setup_policy

    values = {"policy": "seed_x", "policy_options": json.dumps({"tiny": True}), "cfg_scale": "1.0"}
    with pytest.raises(ValueError, match="no trainable choice without think-then-draw"):
        setup_policy(load_config(None, values), torch.device("cpu"))
    policy = setup_policy(load_config(None, {**values, "plan": "true", "plan_max_tokens": "4"}), torch.device("cpu"))
    assert policy.plan == PlanSettings(max_tokens=4)
    with pytest.raises(ValueError, match="no trainable choice"):
        setup_policy(load_config(None, {**values, "plan": "true", "train_plan": "false"}), torch.device("cpu"))


def test_detokenizer_input_is_not_normalised_as_in_the_release_config():
    """The release's de-tokenizer config sets normalize: False: the resampler reads the features as they are."""
    from policies.modules.seed_x import ResamplerXLV2, SeedXConfig

    assert SeedXConfig().detokenizer_normalize is False
    assert SeedXConfig().num_inference_steps == 50  # the release's text-to-image scripts (generate() says 30)
    torch.manual_seed(0)
    resampler = ResamplerXLV2(32, 1, 8, 4, 64, 16, 8, 16).eval()
    x = torch.randn(2, 64, 16) * 3.0
    with torch.no_grad():
        # the definition, step by step, on the raw features
        latents = resampler.latents.expand(2, -1, -1)
        features = resampler.proj_in(x)
        for attn, ff in resampler.layers:
            latents = attn(features, latents) + latents
            latents = ff(latents) + latents
        hidden = resampler.norm_out(latents)
        expected = torch.cat([resampler.unet_proj_1(hidden), resampler.unet_proj_2(hidden)], dim=-1)
        embeds, pooled = resampler(x)
        assert torch.allclose(embeds, expected, atol=1e-6)
        assert torch.allclose(pooled, resampler.unet_attnpool(hidden), atol=1e-6)
        # normalising (the class default of the release) would change the result; it is scale-invariant then
        resampler.normalize = True
        normalised, _ = resampler(x)
        assert not torch.allclose(normalised, embeds, atol=1e-3)
        assert torch.allclose(resampler(2 * x)[0], normalised, atol=1e-5)
