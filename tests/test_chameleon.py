"""Chameleon / Anole specifics: the restricted image head, the VQGAN decoder and its release-checkpoint loader, the
interleaved mode, and a short GRPO run on the demo reward."""

import copy

import numpy as np
import pytest
import torch
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

import policies
from policies.base import position_ids_from_mask
from conftest import PROMPTS, run_tiny_grpo
from policies.chameleon import _image_token_name
from policies.checkpoints.vqgan import load_vqgan_decoder, save_vqgan_decoder
from policies.modules.vqgan import VQGANDecoder


@pytest.fixture(scope="module")
def chameleon():
    return policies.build("chameleon", tiny=True)


# ----------------------------------------------------------------------------------------------------------------
# The image head


def test_restricted_image_head_equals_the_image_columns_of_lm_head(chameleon):
    hidden = torch.randn(5, chameleon.model.config.hidden_size)
    with torch.no_grad():
        full = chameleon.model.lm_head(hidden)
        restricted = chameleon.image_logits(hidden)
    image_ids = chameleon.model.model.vocabulary_mapping.image_tokens
    assert restricted.shape == (5, chameleon.decoder.config.num_embeddings)
    assert torch.allclose(restricted, full[:, image_ids], atol=1e-6)
    # transformers' own forward hides exactly these columns, which is why the policy applies them itself
    with torch.no_grad():
        out = chameleon.model(input_ids=torch.tensor([[chameleon.bos_id, chameleon.boi_id]])).logits[0, -1]
    assert (out[image_ids] == torch.finfo(out.dtype).min).all()


def test_codebook_index_comes_from_the_token_name(chameleon):
    vocab = chameleon.tokenizer.get_vocab()
    for code in (0, 7, 10, 123, 255):
        bpe = vocab[_image_token_name(code)]
        assert chameleon._bpe_to_code[bpe].item() == code
    assert _image_token_name(1203) == "IMGIMGBCADZ"


# ----------------------------------------------------------------------------------------------------------------
# The VQGAN decoder and the release checkpoint


def release_decoder_shapes(ch, ch_mult, num_res_blocks, z_channels, embed_dim, n_embed, out_ch=3):
    """Key -> shape of the decoder part of a taming-transformers VQGAN state dict, written from the release's module
    tree (notes §9.1), independently of policies/chameleon.py."""
    shapes = {"quantize.embedding.weight": (n_embed, embed_dim),
              "post_quant_conv.weight": (z_channels, embed_dim, 1, 1), "post_quant_conv.bias": (z_channels,)}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in)
    norm("decoder.mid.attn_1.norm", block_in)
    for part in ("q", "k", "v", "proj_out"):
        conv(f"decoder.mid.attn_1.{part}", block_in, block_in, 1)
    resnet("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(len(ch_mult))):
        block_out = ch * ch_mult[level]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", block_in, block_out)
            block_in = block_out
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    return shapes


TINY_VQ = dict(embed_dim=8, num_embeddings=64, latent_channels=16, resolution=32, base_channels=32,
               channel_multiplier=[1, 2, 2], num_res_blocks=1)


def release_checkpoint(path, shapes, seed=0, extra=None):
    """A Lightning-style checkpoint in the release's key layout, with encoder/loss keys the decoder must skip."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    state["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3, generator=generator)
    state["quant_conv.weight"] = torch.randn(8, 16, 1, 1, generator=generator)
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4, generator=generator)
    state.update(extra or {})
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, path)
    return state


def test_real_decoder_has_exactly_the_release_keys():
    """The decoder built from Chameleon-7B's vq_config (transformers' defaults) expects exactly the release's keys."""
    decoder = VQGANDecoder(ChameleonVQVAEConfig())
    shapes = release_decoder_shapes(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
                                    embed_dim=256, n_embed=8192)
    assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == shapes
    assert decoder.grid == 32  # 512 px / 16: 1024 tokens
    assert "decoder.up.1.block.0.nin_shortcut.weight" in shapes and "decoder.up.0.upsample.conv.weight" not in shapes


def test_release_checkpoint_loads_with_the_documented_mapping(tmp_path):
    config = ChameleonVQVAEConfig(**TINY_VQ)
    shapes = release_decoder_shapes(32, TINY_VQ["channel_multiplier"], 1, 16, 8, 64)
    state = release_checkpoint(tmp_path / "vqgan.ckpt", shapes)
    decoder = load_vqgan_decoder(VQGANDecoder(config), str(tmp_path / "vqgan.ckpt"))
    loaded = decoder.state_dict()
    assert set(loaded) == set(shapes)
    for key in shapes:
        assert torch.equal(loaded[key], state[key]), key
    # and the decoder writes the same layout back
    save_vqgan_decoder(decoder, str(tmp_path / "again.ckpt"))
    again = torch.load(tmp_path / "again.ckpt", weights_only=True)["state_dict"]
    assert set(again) == set(shapes) and all(torch.equal(again[k], state[k]) for k in shapes)


def test_release_checkpoint_errors_name_the_key(tmp_path):
    config = ChameleonVQVAEConfig(**TINY_VQ)
    shapes = release_decoder_shapes(32, TINY_VQ["channel_multiplier"], 1, 16, 8, 64)
    path = str(tmp_path / "vqgan.ckpt")

    missing = dict(shapes)
    del missing["decoder.up.0.block.0.nin_shortcut.weight"]
    release_checkpoint(path, missing)
    with pytest.raises(KeyError, match=r"missing keys \['decoder.up.0.block.0.nin_shortcut.weight'\]"):
        load_vqgan_decoder(VQGANDecoder(config), path)

    release_checkpoint(path, shapes, extra={"decoder.up.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(KeyError, match=r"unexpected keys \['decoder.up.0.attn.0.q.weight'\]"):
        load_vqgan_decoder(VQGANDecoder(config), path)

    release_checkpoint(path, {**shapes, "quantize.embedding.weight": (8192, 8)})
    with pytest.raises(ValueError, match="quantize.embedding.weight.*shape"):
        load_vqgan_decoder(VQGANDecoder(config), path)

    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_vqgan_decoder(VQGANDecoder(config), str(tmp_path / "nowhere.ckpt"))


def test_build_from_a_directory_needs_its_vqgan(tmp_path, chameleon):
    chameleon.save_pretrained(str(tmp_path))
    (tmp_path / "vqgan.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="vqgan.ckpt"):
        policies.build("chameleon", model_name_or_path=str(tmp_path))


def test_decoder_output_size():
    for vq, side in ((dict(TINY_VQ), 32), (dict(TINY_VQ, resolution=64, channel_multiplier=[1, 1, 1, 1]), 64)):
        decoder = VQGANDecoder(ChameleonVQVAEConfig(**vq)).eval()
        grid = decoder.grid
        with torch.no_grad():
            pixels = decoder(torch.randint(0, vq["num_embeddings"], (2, grid * grid)))
        assert pixels.shape == (2, 3, side, side)
        with pytest.raises(ValueError, match="codes per image"):
            decoder(torch.zeros(1, grid * grid - 1, dtype=torch.long))


def test_decoder_reads_a_contiguous_latent_as_the_release_does():
    """The release feeds the decoder a contiguous latent; a permuted (channels-last) one rounds differently in the
    convolutions. Ours equals the contiguous path bitwise (at a real-width first level, where the layouts differ)."""
    decoder = VQGANDecoder(ChameleonVQVAEConfig(**dict(TINY_VQ, embed_dim=64, latent_channels=64))).eval()
    codes = torch.randint(0, TINY_VQ["num_embeddings"], (2, decoder.grid ** 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = decoder.quantize.embedding(codes).view(2, decoder.grid, decoder.grid, -1).permute(0, 3, 1, 2)
        contiguous = decoder.decoder(decoder.post_quant_conv(latent.contiguous()))
        assert torch.equal(decoder(codes), contiguous)


# ----------------------------------------------------------------------------------------------------------------
# Interleaved mode


@pytest.fixture(scope="module")
def interleaved():
    """A tiny interleaved policy whose output layer makes BOI likely (a random one almost never opens an image)."""
    policy = policies.build("chameleon", tiny=True, mode="interleaved", text_tokens=6, seed=1)
    ids, mask = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        hidden = policy.hidden_states(ids, mask, position_ids_from_mask(mask))[mask.bool()]
        direction = hidden.mean(0)
        policy.model.lm_head.weight[policy.boi_id] = 3.0 * direction / direction.norm() ** 2  # BOI logit about 3
    return policy


def test_interleaved_rollout_structure(interleaved):
    policy = interleaved
    rollout = policy.sample(PROMPTS, 4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    grid_tokens = policy.grid * policy.grid
    n, t = rollout.completion_ids.shape
    assert t == policy.num_completion_tokens == 6 + grid_tokens + 2
    completion_mask = rollout.extras["completion_mask"].bool()
    is_image = policy._is_image[rollout.completion_ids]
    opened = 0
    for row in range(n):
        ids, live = rollout.completion_ids[row], completion_mask[row]
        boi = (ids == policy.boi_id).nonzero().flatten()
        assert len(boi) <= 1
        if len(boi):
            opened += 1
            b = int(boi[0])
            assert rollout.action_mask[row, b]  # opening an image is the policy's choice
            assert is_image[row, b + 1:b + 1 + grid_tokens].all() and is_image[row].sum() == grid_tokens
            assert ids[b + 1 + grid_tokens] == policy.eoi_id and not rollout.action_mask[row, b + 1 + grid_tokens]
            assert rollout.logprobs[row, b + 1 + grid_tokens] == 0
            assert rollout.action_mask[row, b + 1:b + 1 + grid_tokens].all()
        else:
            assert not is_image[row].any()
        # text is made of actions; after EOS (or never) the row is padding: not attended, not an action
        assert (rollout.action_mask[row] == (live & (ids != policy.eoi_id))).all()
        end = (ids == policy.eos_id).nonzero().flatten()
        if len(end):
            assert not live[int(end[0]) + 1:].any() and (ids[int(end[0]) + 1:] == policy.pad_id).all()
        else:
            assert live.all()
    assert 0 < opened < n, "the test needs rows with and without an image"


def test_interleaved_text_steps_write_only_what_the_release_allows(interleaved):
    """The release's text decoder allows EOS, BOI and text tokens: not image tokens, nor any token whose name starts
    with "<" (EOI, pad, BOS, END-OF-TURN <reserved08706>, <image>), however likely the model makes them."""
    policy = copy.deepcopy(interleaved)
    vocab = policy.tokenizer.get_vocab()
    special = {i for name, i in vocab.items() if name.startswith("<") and name != "<"}
    allowed = {i for i in range(len(policy._text_banned)) if not policy._text_banned[i]}
    text = set(vocab.values()) - special - set(policy._image_ids.tolist())
    assert allowed == text | {policy.eos_id, policy.boi_id}
    assert {policy.eot_id, policy.eoi_id, policy.pad_id, policy.bos_id, vocab["<image>"]} <= special - allowed
    # make END-OF-TURN and <image> the most likely tokens at every text step: they are still never written
    with torch.no_grad():
        weight = policy.model.lm_head.weight
        for banned in (policy.eot_id, vocab["<image>"]):
            weight[banned] = weight[policy.boi_id] * 3
    rollout = policy.sample(PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    written = rollout.completion_ids[rollout.action_mask.bool()]
    assert not torch.isin(written, torch.tensor(sorted(special - {policy.eos_id, policy.boi_id}))).any()
    scored = policy.token_logprobs(rollout, "mixture").detach()
    assert (scored - rollout.logprobs)[rollout.action_mask.bool()].abs().max() <= 1e-4


def test_interleaved_logprobs_reproduce_sampling(interleaved):
    for cfg_scale, temperature, top_k, top_p in ((3.0, 1.0, 0, 1.0), (1.0, 0.8, 0, 1.0), (2.0, 1.0, 20, 0.9)):
        rollout = interleaved.sample(PROMPTS, 4, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            scored, entropy = interleaved.token_logprobs(rollout, "mixture", return_entropy=True)
        mask = rollout.action_mask
        text = mask & ~interleaved._is_image[rollout.completion_ids]
        assert (rollout.completion_ids[text] == interleaved.boi_id).any()  # BOI itself is scored
        assert (scored - rollout.logprobs)[mask].abs().max() <= 1e-4
        assert torch.isfinite(scored[mask]).all() and (entropy[mask] >= 0).all()
        assert (scored[~mask] == 0).all() and (rollout.logprobs[~mask] == 0).all()  # forced EOI and padding


def test_interleaved_decode_finds_the_image_span(interleaved, caplog):
    policy = interleaved
    rollout = policy.sample(PROMPTS, 4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    images = policy.decode(rollout)
    has_boi = (rollout.completion_ids == policy.boi_id).any(1)
    assert policy.last_decode_missing == int((~has_boi).sum()) > 0
    assert "opened no image" in caplog.text
    for image, opened, ids in zip(images, has_boi.tolist(), rollout.completion_ids):
        assert image.size == (policy.image_size, policy.image_size) and image.mode == "RGB"
        if not opened:
            assert image.info.get("no_image") and np.ptp(np.asarray(image)) == 0
            continue
        # the same pixels as decoding the span alone
        b = int((ids == policy.boi_id).nonzero()[0])
        codes = policy._bpe_to_code[ids[b + 1:b + 1 + policy.grid ** 2]]
        with torch.no_grad():
            alone = policy.decoder(codes[None]).clamp(-1, 1)
        expected = ((alone + 1) * 127.5).to(torch.uint8)[0].permute(1, 2, 0).int()
        got = torch.from_numpy(np.asarray(image)).int()
        assert (got - expected).abs().max() <= 1  # batched vs single convolutions may differ by one rounding step
    # a broken span is an error, not a silent wrong picture
    broken = rollout.select(has_boi.nonzero().flatten()[:1])
    b = int((broken.completion_ids[0] == policy.boi_id).nonzero()[0])
    broken.completion_ids[0, b + 3] = policy.eos_id
    with pytest.raises(ValueError, match="not .* image tokens"):
        policy.decode(broken)


# ----------------------------------------------------------------------------------------------------------------
# Learning


def test_lora_stays_in_the_language_model():
    policy = policies.build("chameleon", tiny=True)
    policy.add_lora(r=4, alpha=8)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in policy.model.named_parameters() if "lora_" in n}
    assert adapted and all(".layers." in n and "vqmodel" not in n for n in adapted)
    assert len(adapted) == 7 * policy.model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert not any(p.requires_grad for p in policy.decoder.parameters())


def test_interleaved_mode_runs_through_the_trainer(tmp_path):
    """Rows of different lengths, forced EOI and padding go through the generic GRPO step unchanged."""
    import math

    metrics = run_tiny_grpo(tmp_path, "chameleon", {"tiny": True, "mode": "interleaved", "text_tokens": 4}, steps=2,
                            per_device_train_batch_size=8)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["logprob_gap"] < 1e-4 and metrics[0]["kl"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Think-then-draw (the generic tests in test_think_then_draw.py run on chameleon too)


@pytest.fixture(scope="module")
def planner():
    """A tiny t2i policy with a plan, whose output layer makes the tokens a plan may not write overwhelmingly likely
    (logit about 10) and BOI and EOS likely enough (about 3) that plans stop at either, or run to max_tokens."""
    from policies.plan import PlanSettings

    policy = policies.build("chameleon", tiny=True, seed=2)
    policy.set_plan(PlanSettings(max_tokens=6))
    ids, mask = policy.planner.encode_plan_prompts(PROMPTS)
    with torch.no_grad():
        hidden = policy.hidden_states(ids, mask, position_ids_from_mask(mask))[mask.bool()]
        direction = hidden.mean(0) / hidden.mean(0).norm() ** 2
        weight = policy.model.lm_head.weight
        weight[policy.plan_banned_ids(policy.planner.end_marker_id())] = 10.0 * direction
        weight[[policy.boi_id, policy.eos_id]] = 3.0 * direction
    return policy


def test_a_plan_never_writes_image_tokens_and_stops_at_boi_or_eos(planner):
    rollout = planner.sample(PROMPTS, 8, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    span, written = rollout.plan_ids, planner.planner.plan_written(rollout.plan_ids)
    banned = torch.tensor(planner.plan_banned_ids(planner.planner.end_marker_id()))
    assert len(banned) >= planner.decoder.config.num_embeddings + 4  # the codes, EOI, pad, BOS, <image>
    assert {planner.eoi_id, planner.bos_id, planner.tokenizer.convert_tokens_to_ids("<image>")} <= set(banned.tolist())
    assert not torch.isin(span[written], banned).any()
    last = span[torch.arange(len(span)), written.sum(1) - 1]
    ends = [int((last == token).sum()) for token in (planner.boi_id, planner.eos_id)]
    assert min(ends) > 0 and sum(ends) < len(span), f"need plans ending at BOI, at EOS and at max_tokens: {ends}"
    # the image follows exactly one attended BOI, after the plan's text; the unconditional row sees no text at all
    ids, mask = planner.planner.plan_context(rollout.prompt_ids, rollout.prompt_mask, span)
    assert (((ids == planner.boi_id) & mask.bool()).sum(1) == 1).all()
    uncond = planner.unconditional_mask(ids, mask).bool()
    assert (uncond.sum(1) == 2).all() and (ids[uncond] != planner.bos_id).sum() == len(span)
    # sampling and scoring agree on both spans, whichever way the plan ended (CFG on the image)
    with torch.no_grad():
        scored = planner.token_logprobs(rollout)
    assert (scored - rollout.logprobs)[rollout.action_mask].abs().max() <= 1e-4
    assert rollout.action_mask[:, planner.plan.max_tokens:].all()
    assert len(planner.decode(rollout)) == len(rollout) and planner.last_decode_missing == 0


def test_plan_needs_t2i_mode(interleaved):
    from policies.plan import PlanSettings

    with pytest.raises(ValueError, match="mode='t2i'"):
        interleaved.set_plan(PlanSettings(max_tokens=4))
    assert interleaved.plan is None
