"""The contract every registered policy must satisfy (tiny random-weight models of the real architectures)."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

import policies
from conftest import PROMPTS, build_tiny


def sample(policy, group_size=3, seed=0, **settings):
    settings = {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **settings}
    return policy.sample(PROMPTS, group_size, generator=torch.Generator().manual_seed(seed), **settings)


def test_rollout_shapes_and_dtypes(tiny_policy):
    rollout = sample(tiny_policy)
    n, t = len(PROMPTS) * 3, tiny_policy.num_completion_tokens
    assert rollout.completion_ids.shape == (n, t) and rollout.completion_ids.dtype == torch.long
    assert rollout.action_mask.shape == (n, t) and rollout.action_mask.dtype == torch.bool
    assert rollout.logprobs.shape == (n, t) and rollout.logprobs.dtype == torch.float32
    assert rollout.prompt_ids.shape[0] == n and rollout.prompt_mask.shape == rollout.prompt_ids.shape
    assert rollout.prompts == [p for p in PROMPTS for _ in range(3)]
    assert rollout.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    # free choices have finite, non-positive log-probs; the batch really is left-padded
    free = rollout.logprobs[rollout.action_mask]
    assert torch.isfinite(free).all() and (free <= 0).all()
    assert (rollout.prompt_mask[:, 0] == 0).any() and (rollout.prompt_mask[:, -1] == 1).all()


def test_forced_tokens_have_logprob_zero(tiny_policy):
    """Where action_mask is False the token was forced: log-prob 0 when sampled and when scored (both modes)."""
    rollout = sample(tiny_policy)
    forced = ~rollout.action_mask
    with torch.no_grad():
        for mode in ("mixture", "conditional"):
            assert (tiny_policy.token_logprobs(rollout, mode)[forced] == 0).all()
    assert (rollout.logprobs[forced] == 0).all()


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p", [
    (1.0, 1.0, 0, 1.0), (3.0, 1.0, 0, 1.0), (5.0, 0.7, 0, 1.0), (2.0, 1.3, 0, 1.0), (3.0, 1.0, 32, 0.9),
])
def test_mixture_logprobs_reproduce_sampling(tiny_policy, cfg_scale, temperature, top_k, top_p):
    rollout = sample(tiny_policy, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        scored = tiny_policy.token_logprobs(rollout, "mixture")
    mask = rollout.action_mask
    assert scored.shape == rollout.logprobs.shape
    assert (scored - rollout.logprobs)[mask].abs().max().item() <= 1e-4


def test_cfg_scale_one_is_the_conditional_distribution(tiny_policy):
    rollout = sample(tiny_policy, cfg_scale=1.0)
    with torch.no_grad():
        mixture = tiny_policy.token_logprobs(rollout, "mixture")
        conditional = tiny_policy.token_logprobs(rollout, "conditional")
    assert torch.allclose(mixture, conditional, atol=1e-6)
    if not tiny_policy.token_cfg:
        return  # no token-level guidance (SEED-X guides its diffusion de-tokenizer): the modes coincide by design
    # and with guidance the two modes really differ
    guided = sample(tiny_policy, cfg_scale=4.0)
    with torch.no_grad():
        gap = (tiny_policy.token_logprobs(guided, "mixture") - tiny_policy.token_logprobs(guided, "conditional"))
    assert gap[guided.action_mask].abs().max() > 1e-3


def test_samples_do_not_depend_on_batch_padding(tiny_policy):
    """A prompt scored alone (no padding) and inside a padded batch gets the same log-probs."""
    rollout = sample(tiny_policy)
    alone = tiny_policy.sample(PROMPTS[:1], 1, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    alone_in_batch = rollout.select(torch.tensor([0]))
    alone_in_batch.completion_ids = alone.completion_ids
    with torch.no_grad():
        a = tiny_policy.token_logprobs(alone, "mixture")
        b = tiny_policy.token_logprobs(alone_in_batch, "mixture")
    assert (rollout.prompt_mask[0] == 0).any(), "the short prompt must be padded in the batch"
    assert (a - b).abs().max() <= 1e-4


def test_seeded_sampling_is_reproducible(tiny_policy):
    a, b, c = sample(tiny_policy, seed=1), sample(tiny_policy, seed=1), sample(tiny_policy, seed=2)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_decode_gives_images_of_the_configured_size(tiny_policy):
    rollout = sample(tiny_policy, group_size=2)
    images = tiny_policy.decode(rollout)
    assert len(images) == len(rollout)
    for image in images:
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (tiny_policy.image_size, tiny_policy.image_size)
    assert len({im.tobytes() for im in images}) > 1, "different tokens must give different images"


def test_only_lora_and_image_heads_receive_gradients(policy_name):
    policy = build_tiny(policy_name)
    policy.add_lora(r=4, alpha=8)
    rollout = sample(policy)
    logprobs = policy.token_logprobs(rollout, "mixture")
    (logprobs * rollout.action_mask).sum().backward()
    with_grad = {n for n, p in policy.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "no parameter received a gradient"
    for name in with_grad:
        assert "lora_" in name or "modules_to_save" in name, f"{name} is frozen but got a gradient"
    assert any("lora_" in n for n in with_grad)
    frozen = [p for n, p in policy.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    assert all(not p.requires_grad for p in frozen)


def test_entropy_carries_a_gradient_only_when_asked(policy_name):
    """For an entropy bonus the scored distribution's entropy must reach the adapter; by default it is detached."""
    policy = build_tiny(policy_name)
    policy.add_lora(r=4, alpha=8)
    rollout = sample(policy)
    _, detached = policy.token_logprobs(rollout, "mixture", return_entropy=True)
    assert not detached.requires_grad
    logprobs, entropy = policy.token_logprobs(rollout, "mixture", return_entropy=True, entropy_grad=True)
    torch.testing.assert_close(entropy.detach(), detached)
    (entropy * rollout.action_mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in policy.model.named_parameters() if "lora_" in n)


def test_reference_is_the_base_model_and_kl_starts_at_zero(policy_name):
    """With a fresh adapter the policy equals its reference exactly, so the k3 KL of step 0 is exactly 0."""
    policy = build_tiny(policy_name)
    rollout = sample(policy)
    with torch.no_grad():
        before = policy.token_logprobs(rollout)
        policy.add_lora(r=4, alpha=8)
        with_adapter = policy.token_logprobs(rollout)
        with policy.reference():
            reference = policy.token_logprobs(rollout)
    assert torch.equal(before, with_adapter) and torch.equal(before, reference)
    delta = reference - with_adapter
    assert (torch.exp(delta) - delta - 1).abs().max().item() == 0.0


def test_save_and_load_round_trip(policy_name, tmp_path):
    policy = build_tiny(policy_name, seed=3)
    policy.save_pretrained(str(tmp_path))
    loaded = policies.build(policy_name, model_name_or_path=str(tmp_path))
    loaded.set_plan(policy.plan)
    rollout = sample(policy)
    again = sample(loaded)
    assert torch.equal(rollout.completion_ids, again.completion_ids)
    with torch.no_grad():
        assert torch.allclose(policy.token_logprobs(rollout), loaded.token_logprobs(rollout), atol=1e-6)
    assert [im.tobytes() for im in policy.decode(rollout)] == [im.tobytes() for im in loaded.decode(rollout)]


def test_build_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown policy 'dalle'"):
        policies.build("dalle", tiny=True)
    with pytest.raises(ValueError, match="unknown option"):
        policies.build("janus", tiny=True, resolution_typo=3)
    with pytest.raises(ValueError, match="exactly one"):
        policies.build("janus")


def test_janus_refuses_a_pad_token_other_than_the_releases():
    """The unconditional CFG row is the prompt blanked with the release's pad token, `<｜▁pad▁｜>`."""
    from policies.janus import RELEASE_PAD_TOKEN, JanusPolicy
    from policies.tiny import tiny_janus

    model, processor = tiny_janus()
    JanusPolicy(model, processor)  # the tiny tokenizer has no such token: its own pad is used
    processor.tokenizer.add_tokens([RELEASE_PAD_TOKEN], special_tokens=True)
    with pytest.raises(ValueError, match="is not the release's"):
        JanusPolicy(model, processor)
    processor.tokenizer.pad_token = RELEASE_PAD_TOKEN
    assert JanusPolicy(model, processor).pad_id == processor.tokenizer.convert_tokens_to_ids(RELEASE_PAD_TOKEN)


def test_top_p_boundary_is_decided_once_at_sampling_and_replayed_in_scoring():
    """A token whose preceding mass sits on top_p: logits that differ in the last bits (incremental decode vs
    teacher forcing) fall on different sides, and recomputing the cut moves every log-prob of the step. Scoring
    with the sampler's kept count keeps the same set, so the two agree to float precision."""
    from policies.base import SamplingSettings, kept_counts, process_logits

    settings = SamplingSettings(top_p=0.9)
    base = torch.tensor([[0.5, 0.4, 0.06, 0.04]]).log()
    sides = []
    for nudge in torch.linspace(-4e-6, 4e-6, 41):
        logits = base.clone()
        logits[0, 1] += nudge  # the second token's mass takes the cumulative mass across 0.9
        sides.append(int(kept_counts(process_logits(logits, None, settings))))
    assert set(sides) == {2, 3}, "the construction must straddle the boundary"
    incremental = base.clone()
    incremental[0, 1] += 4e-6
    teacher_forced = base.clone()
    teacher_forced[0, 1] -= 4e-6
    sampled = process_logits(incremental, None, settings)
    kept = kept_counts(sampled)
    recomputed = process_logits(teacher_forced, None, settings)
    replayed = process_logits(teacher_forced, None, settings, kept)
    token = torch.tensor([0])
    lp = lambda logits: torch.log_softmax(logits, -1)[0, token]  # noqa: E731
    assert (lp(sampled) - lp(recomputed)).abs() > 1e-2  # the flip: the kept set changed
    assert (lp(sampled) - lp(replayed)).abs() < 1e-5
    assert torch.equal(torch.isfinite(replayed), torch.isfinite(sampled))
    # a row that was not sampled (kept 0) keeps everything; without truncation kept is ignored
    assert torch.isfinite(process_logits(teacher_forced, None, settings, torch.tensor([0]))).all()
    assert torch.isfinite(process_logits(teacher_forced, None, SamplingSettings(), torch.tensor([1]))).all()


@pytest.mark.parametrize("policy_name", ["janus", "chameleon"])
def test_rollouts_carry_the_kept_counts_scoring_replays(policy_name):
    policy = build_tiny(policy_name)
    rollout = policy.sample(PROMPTS, 2, top_k=20, top_p=0.8, generator=torch.Generator().manual_seed(0))
    free = rollout.action_mask
    assert rollout.kept.shape == rollout.completion_ids.shape
    assert (rollout.kept[free] >= 1).all() and (rollout.kept[free] <= 20).all() and (rollout.kept[~free] == 0).all()
    with torch.no_grad():
        scored = policy.token_logprobs(rollout)
        # scoring keeps exactly the sampled sets: forcing other counts changes the log-probs
        other = policy.token_logprobs(replace(rollout, kept=torch.where(free, 1, 0).int()))
    assert (scored - rollout.logprobs)[free].abs().max() <= 1e-4
    # kept 1: only the most likely token stays, so a sampled token scores 0 if it was the argmax, else -inf
    assert ((other[free] == 0) | (other[free] == float("-inf"))).all() and (other[free] == float("-inf")).any()


@pytest.mark.parametrize("policy_name", ["janus", "emu3"])
def test_pixels_are_truncated_as_the_releases_write_them(policy_name):
    """Janus-Pro's generation_inference.py and Emu3's postprocess: np.clip((x + 1) / 2 * 255, 0, 255) cast to uint8
    (truncation). Rounding would put about half the values one level higher."""
    import numpy as np

    policy = build_tiny(policy_name)
    rollout = sample(policy, group_size=2)
    with torch.no_grad():
        if policy_name == "janus":
            decoded = policy.model.decode_image_tokens(rollout.image_ids).float().numpy()  # [B, H, W, 3]
        else:
            decoded = policy.model.decode_image_tokens(image_tokens=rollout.image_ids, height=policy.height,
                                                       width=policy.width).float().permute(0, 2, 3, 1).numpy()
    release = np.clip((decoded + 1) / 2 * 255, 0, 255).astype(np.uint8)
    ours = np.stack([np.asarray(image) for image in policy.decode(rollout)])
    assert np.array_equal(ours, release)
    inside = (decoded > -1) & (decoded < 1)  # unsaturated values: there rounding differs from truncation
    rounded = np.clip((decoded + 1) / 2 * 255, 0, 255).round().astype(np.uint8)
    assert inside.mean() > 0.1 and (rounded != release)[inside].mean() > 0.3


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(tiny_policy):
    from policies.base import SamplingSettings, process_logits

    logits = torch.tensor([[0.0, -1.0, -2.0, -3.0]]).log_softmax(-1)
    probs = logits.softmax(-1)
    kept = torch.isfinite(process_logits(logits, None, SamplingSettings(min_p=0.3)))
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist() == [[True, True, False, False]]
    # sampled and scored alike: the kept sets are replayed
    rollout = sample(tiny_policy, min_p=0.2)
    assert rollout.sampling.min_p == 0.2 and rollout.sampling.truncates
    with torch.no_grad():
        scored = tiny_policy.token_logprobs(rollout)
    free = rollout.action_mask
    assert (scored - rollout.logprobs)[free].abs().max() <= 1e-4
    assert torch.isfinite(scored[free]).all()


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_decode_steps_through_the_layers_equal_the_stack_forward(tiny_policy, policy_name, lora):
    """The engine's layer loop (decode steps call the language model's layers, not its forward) is on for every
    family, and each step's hidden state is bitwise the forward's: on left-padded rows with a fed column left
    unattended, and on rows without padding (where the loop is given no mask at all); with a LoRA adapter whose
    update is not zero, too (the loop calls the wrapped layers)."""
    from transformers import DynamicCache

    from policies.base import CachedDecoder, layer_loop

    policy = tiny_policy
    if lora:
        policy = build_tiny(policy_name)
        policy.add_lora(r=4)
        with torch.no_grad():
            for name, weight in policy.model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    step = layer_loop(policy.decoder_stack, policy.stack_takes_embeds)
    assert step is not None, f"{policy.name}: its decoder stack does not run the layer loop"

    def last_hidden(inputs, mask, positions, cache):
        return policy.hidden_states(inputs, mask, positions, cache)[:, -1]

    kinds = set()
    for prompts, guided in ((PROMPTS, True), (PROMPTS[1:], False)):
        for stream in policy.image_streams(*policy.encode_prompts(prompts), 2, guided and policy.token_cfg):
            inputs = policy.context_inputs(stream.ids)
            decoders = [CachedDecoder(last_hidden, inputs, stream.mask, stream.repeats,
                                      DynamicCache(config=policy.cache_config), max_new_tokens=4, step_forward=forward)
                        for forward in (step, None)]
            kinds.add(decoders[0].padded)
            rows, choices = len(decoders[0].mask), policy.image_logits(decoders[0].last).shape[-1]
            codes = torch.randint(0, choices, (rows, 4), generator=torch.Generator().manual_seed(0))
            tokens = policy.image_token_ids(codes)
            for t in range(4):
                attended = None
                if t == 2 and decoders[0].padded:
                    attended = torch.ones(rows, dtype=torch.long)
                    attended[0] = 0
                got, expected = (d.step(policy.image_inputs(tokens[:, t : t + 1]), attended) for d in decoders)
                assert torch.equal(got, expected), f"{policy.name}: step {t} differs by {(got - expected).abs().max()}"
    assert kinds == {True, False}  # both the masked and the mask-free steps were compared
    if lora:  # the update is not zero, so the comparisons above ran a live adapter: without it the states differ
        ids, mask = policy.encode_prompts(PROMPTS)
        inputs = policy.context_inputs(ids)
        def start():
            return CachedDecoder(last_hidden, inputs, mask, 1, DynamicCache(config=policy.cache_config),
                                 max_new_tokens=1, step_forward=step)

        adapted = start()
        with policy.reference():
            base = start()
            base_step = base.step(policy.image_inputs(tokens[: len(ids), :1]))
        assert not torch.equal(adapted.step(policy.image_inputs(tokens[: len(ids), :1])), base_step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_sampling_from_non_finite_logits_is_a_clear_error(bad):
    """A NaN, a +inf, or a row with every token masked out gives that row a NaN log-prob, which `check_sampled`
    turns into an error naming the cause; -inf entries beside finite ones are ordinary truncation."""
    from policies.base import check_sampled, sample_from_logits

    logits = torch.randn(3, 16)
    logits[0, :4] = float("-inf")  # truncated: fine
    tokens, logprobs = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert (tokens[0] >= 4) and torch.isfinite(logprobs).all()
    check_sampled(logprobs)
    if bad == "all -inf":
        logits[1] = float("-inf")
    else:
        logits[1, 5] = bad
    tokens, logprobs = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert torch.isfinite(logprobs[[0, 2]]).all() and logprobs[1].isnan()
    assert ((tokens >= 0) & (tokens < 16)).all()  # still a valid index: the next step can be fed without a crash
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        check_sampled(logprobs)


def test_a_policy_with_nan_weights_fails_its_rollout_clearly():
    """The check runs once after the decode loop, and it does run: NaN in the image head is a FloatingPointError
    from `sample`, not a rollout of garbage tokens."""
    policy = policies.build("janus", tiny=True)
    with torch.no_grad():
        policy.model.model.generation_head.vision_head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        sample(policy, group_size=2)


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at upper tail ~1e-4 (Wilson-Hilferty; z is the normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def drawn_counts(logits: torch.Tensor, rows: int, calls: int, generator: torch.Generator) -> torch.Tensor:
    """How often `sample_from_logits` draws each token of `logits` [V] in `calls` calls of `rows` rows each; every
    call's log-probs must be exactly the log-softmax at the drawn tokens."""
    from policies.base import sample_from_logits

    counts = torch.zeros(len(logits), dtype=torch.float64)
    batch = logits.expand(rows, -1)
    for _ in range(calls):
        tokens, logprobs = sample_from_logits(batch, generator)
        assert torch.equal(logprobs, torch.log_softmax(batch, -1).gather(-1, tokens[:, None]).squeeze(-1))
        counts += torch.bincount(tokens, minlength=len(logits)).double()
    return counts


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return ((observed - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("vocab,masked,spread,bins", [(7, 0, 1.0, None), (300, 100, 2.0, None), (16384, 4096, 1.0, 64)])
def test_sampling_draws_the_softmax_distribution(vocab, masked, spread, bins):
    """`sample_from_logits` (inverse CDF) samples the softmax of its logits: a chi-square goodness-of-fit test over
    many draws from fixed logits at a fixed seed (per token, or per group of `bins` consecutive tokens for the
    16k codebook), masked tokens never drawn, the log-prob exactly the log-softmax at the drawn token, and the same
    tokens again from the same seed."""
    from policies.base import sample_from_logits

    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * spread
    logits[:masked] = float("-inf")
    probs = torch.softmax(logits.double(), -1)
    rows, calls = (20_000, 10) if vocab < 1000 else (1_000, 20)
    counts = drawn_counts(logits, rows, calls, torch.Generator().manual_seed(7))
    assert counts[:masked].sum() == 0, "a masked-out token was drawn"
    observed, expected = counts[masked:], probs[masked:] * counts.sum()
    if bins is not None:
        observed, expected = observed.view(bins, -1).sum(-1), expected.view(bins, -1).sum(-1)
    rare = expected < 5  # pooled into one bin, so that the chi-square approximation holds
    if rare.any():
        observed = torch.cat([observed[~rare], observed[rare].sum(0, keepdim=True)])
        expected = torch.cat([expected[~rare], expected[rare].sum(0, keepdim=True)])
    statistic = chi_square(observed, expected)
    assert statistic < chi_square_critical(len(expected) - 1), statistic
    again, _ = sample_from_logits(logits.expand(8, -1), torch.Generator().manual_seed(3))
    assert torch.equal(again, sample_from_logits(logits.expand(8, -1), torch.Generator().manual_seed(3))[0])


def test_the_goodness_of_fit_test_rejects_a_wrong_sampler():
    """The test above has power: draws from a slightly wrong distribution (one token's logit moved by 0.1, its
    probability ~10% off) fail it."""
    logits = torch.randn(7, generator=torch.Generator().manual_seed(7))
    wrong = logits.clone()
    wrong[3] += 0.1
    counts = drawn_counts(wrong, 20_000, 10, torch.Generator().manual_seed(7))
    assert chi_square(counts, torch.softmax(logits.double(), -1) * counts.sum()) > chi_square_critical(6)


def test_a_rollout_does_not_read_back_from_the_device_every_step(tiny_policy):
    """No value is read back to the host per decode step (`.item()`, `bool(tensor)`: on CUDA each is a sync that
    stalls the loop until the GPU catches up). Counted on CPU at the dispatcher: a few reads per rollout (the last
    free position, whether the prompts are padded, the finiteness check at the end), not one per token. A plan
    stops when every row has finished, which is one read per plan token by design."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    planned = tiny_policy.planner.settings.max_tokens if tiny_policy.planner is not None else 0
    with CountReads() as counter:
        sample(tiny_policy, group_size=2)
    forced = tiny_policy.forced_image_tokens
    free = tiny_policy.num_image_tokens if forced is None else int((forced < 0).sum())
    # one read per step would be one per sampled token: 16 or more in every family's image (SEED-X samples a plan)
    assert free >= 16 or planned
    assert counter.reads < 16 + planned, f"{counter.reads} reads for {free} sampled image tokens"
