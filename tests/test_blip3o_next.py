"""BLIP3o-NEXT specifics: the whole tiny path (AR tokens -> hidden states -> connector -> Sana Euler/CFG -> DC-AE),
reproducible decoding, the restricted image-token head, the release checkpoint layout, and a GRPO run that learns.
The contract suite (tests/test_policy_contract.py) runs on it too."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import policies
from policies.modules.sana_decoder import flow_scheduler

PROMPTS = ["a red image", "a photo of two dogs next to a blue car on the left"]


@pytest.fixture(scope="module")
def tiny():
    return policies.build("blip3o_next", tiny=True, seed=1)


def sample(policy, group_size=2, seed=0, **settings):
    return policy.sample(PROMPTS, group_size, generator=torch.Generator().manual_seed(seed), **settings)


def test_whole_path_on_cpu(tiny):
    rollout = sample(tiny)
    t = tiny.num_completion_tokens
    # actions are image tokens only (restricted by default)
    ids = rollout.completion_ids
    assert ids.shape == (4, t) and ((ids >= tiny.image_start) & (ids < tiny.image_start + tiny.codebook_size)).all()
    # the prompt ends with <im_start><S0>
    assert rollout.prompt_ids[:, -2:].tolist() == [[tiny.ids["image_start_tag_id"],
                                                    tiny.ids["scale_start_token_id"]]] * 4
    with torch.no_grad():
        hidden = tiny.decoder_hidden_states(rollout.prompt_ids, rollout.prompt_mask, ids)
        condition = tiny.decoder.connector(hidden)
    assert hidden.shape == (4, t + 1, tiny.model.config.hidden_size)  # <S0> + every image token
    assert condition.shape == (4, t + 1, tiny.decoder.sana.config.caption_channels)
    assert tiny.diffusion_steps == 2
    images = tiny.decode(rollout)
    assert [im.size for im in images] == [(tiny.image_size, tiny.image_size)] * 4 and tiny.image_size == 32
    assert len({im.tobytes() for im in images}) == 4


def test_decoding_is_reproducible_and_seeded_per_row(tiny):
    rollout = sample(tiny)
    first, again = tiny.decode(rollout), tiny.decode(rollout)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    # micro-batching does not change a row's image beyond float rounding: the CPU kernels of a batch of 1 and of 4
    # round differently (seen with torch 2.14: one uint8 level on ~0.03% of the values of one image)
    tiny.decode_batch_size, batch_size = 1, tiny.decode_batch_size
    try:
        for alone, batched in zip(tiny.decode(rollout), first):
            difference = np.abs(np.asarray(alone, dtype=np.int16) - np.asarray(batched, dtype=np.int16))
            assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    finally:
        tiny.decode_batch_size = batch_size
    reseeded = rollout.select(torch.arange(len(rollout)))
    reseeded.extras = {"decode_seed": rollout.extras["decode_seed"] + 1}
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, tiny.decode(reseeded)))
    # a rollout sampled with the same generator gets the same seeds, a different one different seeds
    assert torch.equal(sample(tiny).extras["decode_seed"], rollout.extras["decode_seed"])
    assert not torch.equal(sample(tiny, seed=9).extras["decode_seed"], rollout.extras["decode_seed"])
    no_seed = rollout.select(torch.arange(1))
    no_seed.extras = {}
    with pytest.raises(ValueError, match="decode_seed"):
        tiny.decode(no_seed)


def test_restricted_head_is_the_image_rows_of_lm_head(tiny):
    hidden = torch.randn(3, tiny.model.config.hidden_size)
    with torch.no_grad():
        full = tiny.model.lm_head(hidden)
        restricted = tiny.image_logits(hidden)
    assert restricted.shape == (3, tiny.codebook_size)
    assert torch.allclose(restricted, full[:, tiny.image_start : tiny.image_start + tiny.codebook_size], atol=1e-6)


def test_full_vocabulary_option_samples_and_scores_like_the_release(tiny):
    policy = policies.build("blip3o_next", tiny=True, seed=1, restrict_to_image_tokens=False)
    rollout = sample(policy, group_size=3, cfg_scale=2.0)
    with torch.no_grad():
        scored = policy.token_logprobs(rollout)
    assert (scored - rollout.logprobs).abs().max() <= 1e-4
    # a random model puts most of its mass outside the 64 image ids: the option really is unrestricted
    outside = (rollout.completion_ids < policy.image_start) | (rollout.completion_ids >= policy.image_start + 64)
    assert outside.any()
    assert len(policy.decode(rollout)) == len(rollout)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_loop_matches_diffusers_flow_match_scheduler(tiny, shift):
    """Our loop = FlowMatchEulerDiscreteScheduler with the release's sigmas (linspace(1, 1/n, n)), CFG on the
    velocity against the connector's zero condition."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    decoder, steps, scale = tiny.decoder, 3, 2.0
    hidden = torch.randn(2, 5, tiny.model.config.hidden_size)
    noise = torch.randn(2, *decoder.latent_shape)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    # the release's sigmas: linspace(1, 1/steps), shifted, then 0
    release = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 1 / steps, steps)] + [0.0]
    assert np.allclose(flow_scheduler(steps, shift).sigmas.numpy(), release, atol=1e-6)
    with torch.no_grad():
        context = decoder.connector(torch.cat([torch.zeros_like(hidden), hidden]))
        latents = noise.clone()
        for t in scheduler.timesteps:
            v = decoder.sana(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=context,
                             timestep=t.expand(4), return_dict=False)[0]
            null, cond = v.chunk(2)
            latents = scheduler.step(null + scale * (cond - null), t, latents, return_dict=False)[0]
        expected = decoder.vae.decode(latents / decoder.vae.config.scaling_factor, return_dict=False)[0]
        ours = decoder(hidden, noise, scale, steps, shift)
    assert torch.allclose(ours, expected, atol=1e-4)


def write_release_checkpoint(policy, folder, sana_repo, drop_key=None):
    """A tiny checkpoint as the release lays it out: one state dict (Qwen keys, model.sana.*, model.sana_vae.*,
    model.diffusion_connector.*, plus TA-Tok / vae_connector weights that text-to-image does not use), config.json
    with the release's fields, tokenizer files; the Sana/DC-AE configs live in a separate diffusers-style repo."""
    folder.mkdir()
    state = dict(policy.model.state_dict())
    for prefix, module in (("model.sana.", policy.decoder.sana), ("model.sana_vae.", policy.decoder.vae),
                           ("model.diffusion_connector.", policy.decoder.connector)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    state["model.vision_tower.vision_tower.embeddings.weight"] = torch.zeros(4, 4)
    state["model.vae_connector.0.weight"] = torch.zeros(4, 4)
    if drop_key:
        state.pop(drop_key)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = policy.model.config.to_dict()
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # transformers 4.x field names, as released
    config.update({"architectures": ["blip3oQwenForInferenceLM"], "model_type": "blip3o_qwen", "rope_scaling": None,
                   "diffusion_name_or_path": str(sana_repo), "mm_vision_tower": "TA-Tok/ta_tok.pth",
                   **policy.ids,
                   # tiny sizes; a release config lacks these and gets 729 tokens from a 65536-code book
                   "blip3o_tokens_per_image": policy.num_completion_tokens,
                   "blip3o_codebook_size": policy.codebook_size})
    (folder / "config.json").write_text(json.dumps(config))
    policy.tokenizer.save_pretrained(str(folder))
    policy.decoder.sana.save_config(str(sana_repo / "transformer"))
    policy.decoder.vae.save_config(str(sana_repo / "vae"))


def test_release_layout_checkpoint_loads_through_the_real_loader(tiny, tmp_path):
    write_release_checkpoint(tiny, tmp_path / "ckpt", tmp_path / "sana_repo")
    loaded = policies.build("blip3o_next", model_name_or_path=str(tmp_path / "ckpt"), diffusion_steps=2)
    assert loaded.diffusion_guidance_scale == 2.0 and loaded.diffusion_name_or_path == str(tmp_path / "sana_repo")
    rollout = sample(tiny, cfg_scale=3.0)
    assert torch.equal(sample(loaded, cfg_scale=3.0).completion_ids, rollout.completion_ids)
    with torch.no_grad():
        assert torch.allclose(loaded.token_logprobs(rollout), tiny.token_logprobs(rollout), atol=1e-6)
    assert [im.tobytes() for im in loaded.decode(rollout)] == [im.tobytes() for im in tiny.decode(rollout)]
    # and our own layout written from it round-trips without the Sana repo
    loaded.save_pretrained(str(tmp_path / "ours"))
    (tmp_path / "sana_repo" / "transformer" / "config.json").unlink()
    again = policies.build("blip3o_next", model_name_or_path=str(tmp_path / "ours"))
    assert again.diffusion_steps == 2
    assert [im.tobytes() for im in again.decode(rollout)] == [im.tobytes() for im in tiny.decode(rollout)]


def test_release_checkpoint_in_torch_bin_shards_loads(tiny, tmp_path):
    """Checkpoints whose connectors share a norm can only be saved as torch .bin files (sharded here)."""
    from safetensors.torch import load_file

    folder = tmp_path / "ckpt"
    write_release_checkpoint(tiny, folder, tmp_path / "sana_repo")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    loaded = policies.build("blip3o_next", model_name_or_path=str(folder), diffusion_steps=2)
    rollout = sample(tiny, cfg_scale=3.0)
    assert torch.equal(sample(loaded, cfg_scale=3.0).completion_ids, rollout.completion_ids)
    assert [im.tobytes() for im in loaded.decode(rollout)] == [im.tobytes() for im in tiny.decode(rollout)]
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="listed in pytorch_model.bin.index.json are missing"):
        policies.build("blip3o_next", model_name_or_path=str(folder))


def test_loader_names_what_is_missing(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_release_checkpoint(tiny, tmp_path / "no_norm", tmp_path / "repo1",
                             drop_key="model.diffusion_connector.3.weight")
    with pytest.raises(KeyError, match="diffusion connector"):
        policies.build("blip3o_next", model_name_or_path=str(tmp_path / "no_norm"))
    write_release_checkpoint(tiny, tmp_path / "no_sana", tmp_path / "repo2")
    with pytest.raises(OSError, match="diffusion_name_or_path"):
        policies.build("blip3o_next", model_name_or_path=str(tmp_path / "no_sana"),
                       diffusion_name_or_path=str(tmp_path / "missing_sana_copy"))
    config = json.loads((tmp_path / "no_sana" / "config.json").read_text())
    del config["scale_start_token_id"]
    (tmp_path / "no_sana" / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="scale_start_token_id"):
        policies.build("blip3o_next", model_name_or_path=str(tmp_path / "no_sana"))
    # a tied head (Qwen3-1.7B ties lm_head to the embedding) may be absent from the state dict
    write_release_checkpoint(tiny, tmp_path / "tied", tmp_path / "repo3", drop_key="lm_head.weight")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = policies.build("blip3o_next", model_name_or_path=str(tmp_path / "tied"))
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    assert torch.equal(tied.model.lm_head.weight, tiny.model.model.embed_tokens.weight)
    write_release_checkpoint(tiny, tmp_path / "untied", tmp_path / "repo4", drop_key="lm_head.weight")
    with pytest.raises(KeyError, match="lm_head.weight"):
        policies.build("blip3o_next", model_name_or_path=str(tmp_path / "untied"))
    with pytest.raises(OSError, match="cannot find BLIP3o-NEXT checkpoint"):
        policies.build("blip3o_next", model_name_or_path="BLIP3o/not-a-real-checkpoint-id")


# ----------------------------------------------------------------------------------------------------------------
# Think-then-draw (the generic tests in tests/test_think_then_draw.py run on blip3o_next too)


@pytest.fixture()
def planner(tiny):
    from policies.plan import PlanSettings

    tiny.set_plan(PlanSettings(max_tokens=8, temperature=1.5))
    yield tiny
    tiny.set_plan(None)


def test_plan_is_text_before_im_start_and_never_image_tokens(planner):
    tok = planner.tokenizer
    # Qwen's end of turn, not the tokenizer's EOS (</s> in the tiny one, which a plan may then not write)
    assert planner.planner.end_marker_id() == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    assert planner.image_prefix_ids == [tok.convert_tokens_to_ids("<im_start>"), tok.convert_tokens_to_ids("<S0>")]
    # the plan prompt is the released prompt without <im_start><S0>
    ids, mask = planner.planner.encode_plan_prompts(PROMPTS)
    released_ids, released_mask = planner.encode_prompts(PROMPTS)
    assert torch.equal(ids, released_ids[:, :-2]) and torch.equal(mask, released_mask[:, :-2])
    rollout = sample(planner, group_size=8, seed=3)
    written = planner.planner.plan_written(rollout.plan_ids)
    image_only = [f"<I{k}>" for k in range(planner.codebook_size)] + ["<S0>", "<S1>", "<S2>", "<im_end>",
                                                                       tok.eos_token, tok.pad_token]
    banned = torch.tensor(tok.convert_tokens_to_ids(image_only))
    # 69 of the tiny vocabulary's 132 ids are banned: an unbanned random text head would write them all the time
    assert written.sum() >= 50 and not torch.isin(rollout.plan_ids[written], banned).any()
    assert not any("<I" in plan or "<S" in plan for plan in rollout.plans)


def test_plan_rollout_decodes_reproducibly_and_the_image_depends_on_the_plan(planner):
    tok = planner.tokenizer
    rollout = sample(planner, seed=4)
    first = planner.decode(rollout)
    assert [im.tobytes() for im in planner.decode(rollout)] == [im.tobytes() for im in first]
    planner.decode_batch_size, batch_size = 1, planner.decode_batch_size
    try:
        assert [im.tobytes() for im in planner.decode(rollout)] == [im.tobytes() for im in first]
    finally:
        planner.decode_batch_size = batch_size
    # same image tokens and noise seeds, other plans: other pixels (the decoder reads hidden states after the plan)
    swapped = rollout.select(torch.arange(len(rollout)))
    swapped.completion_ids = torch.cat([rollout.plan_ids.flip(0), rollout.image_ids], dim=1)
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, planner.decode(swapped)))

    # a plan that stops at <|im_end|> in a left-padded batch decodes as its compact context would:
    # prompt + "red blue" + <im_start><S0> (end marker, padding and batch padding are holes, positions from the mask)
    red, blue, end, pad = (tok.convert_tokens_to_ids(t) for t in ("red", "blue", "<|im_end|>", tok.pad_token))
    row = rollout.select(torch.tensor([0]))  # the shorter prompt: left-padded in this batch
    assert (row.prompt_mask == 0).any()
    span = torch.tensor([[red, blue, end] + [pad] * 5])
    row.completion_ids = torch.cat([span, row.image_ids], dim=1)
    keep = row.prompt_mask[0].bool()
    compact = torch.cat([row.prompt_ids[0, keep], torch.tensor([red, blue, *planner.image_prefix_ids])])[None]
    with torch.no_grad():
        expected = planner.decoder_hidden_states(compact, torch.ones_like(compact), row.image_ids)
        context_ids, context_mask = planner.image_context(row)
        got = planner.decoder_hidden_states(context_ids, context_mask, row.image_ids)
        pixels = planner.decoder(expected, planner.initial_noise(row.extras["decode_seed"]),
                                 planner.diffusion_guidance_scale, planner.diffusion_steps, planner.diffusion_shift)
    assert torch.allclose(got, expected, atol=1e-5)
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0)
    decoded = torch.tensor(np.array(planner.decode(row)[0]), dtype=torch.float32)
    assert (decoded - pixels).abs().max() <= 1


def test_bf16_decoding_passes_sana_the_timestep_in_float32(tiny):
    """As released: sigma * 1000 in float32 whatever the model dtype (a bf16 timestep turns 750 into 752)."""
    from policies.modules.sana_decoder import DiffusionDecoder

    decoder = copy.deepcopy(tiny.decoder).to(torch.bfloat16)
    seen = []
    decoder.sana.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"]),
                                           with_kwargs=True)
    steps = 4
    with torch.no_grad():
        DiffusionDecoder.forward(decoder, torch.randn(1, 5, tiny.model.config.hidden_size),
                                 torch.randn(1, *decoder.latent_shape), 2.0, steps)
    expected = flow_scheduler(steps).timesteps
    assert [t.dtype for t in seen] == [torch.float32] * steps
    assert torch.equal(torch.stack([t[0] for t in seen]), expected) and 750.0 in expected.tolist()


def test_decoder_hidden_states_differ_from_the_release_only_by_its_missing_mask(tiny):
    """With padding masked out, plain positions give the same hidden states as mask-derived ones (RoPE is relative),
    so what separates the release's hidden-state forward (no attention mask) from ours is the mask alone."""
    rollout = sample(tiny, group_size=1)
    padded = (rollout.prompt_mask == 0).any(dim=1)
    assert padded.any() and not padded.all()  # one prompt is left-padded in the batch
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], dim=1)
    plain = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours = tiny.decoder_hidden_states(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids)
        start = rollout.prompt_ids.shape[1] - 1
        plain_positions = tiny.hidden_states(ids, mask, plain)[:, start:]
        release = tiny.model.model(input_ids=ids).last_hidden_state[:, start:]  # the release's call: no mask
    assert torch.allclose(plain_positions, ours, atol=1e-4)
    assert torch.allclose(release[~padded], ours[~padded], atol=1e-4)
    assert not torch.allclose(release[padded], ours[padded], atol=1e-2)  # the padded row attends to its padding
