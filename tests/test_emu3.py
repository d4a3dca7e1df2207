"""Emu3 specifics beyond the contract: the forced token layout, the restricted head against the model's own full
logits, the release CFG formula, chunked scoring, the negative-prompt choice, a short GRPO run that learns, and
think-then-draw (the generic plan tests run in test_think_then_draw.py)."""

import pytest
import torch

import policies
from conftest import PROMPTS
from policies.base import position_ids_from_mask
from policies.emu3 import Emu3Policy
from policies.plan import PlanSettings


@pytest.fixture(scope="module")
def emu3():
    return policies.build("emu3", tiny=True)


def sample(policy, cfg_scale=3.0, group_size=2, seed=0, **settings):
    return policy.sample(PROMPTS, group_size, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed),
                         **settings)


def full_vocab_logits(policy, prefix_ids, prefix_mask, completion_ids):
    """The model's own forward (full lm_head), teacher-forced; rows predicting completion tokens 0..T-1."""
    ids = torch.cat([prefix_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prefix_mask, prefix_mask.new_ones(completion_ids[:, :-1].shape)], dim=1)
    logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits[:, prefix_ids.shape[1] - 1 :]


def test_sampled_rollout_follows_the_layout_and_forces_structure(emu3):
    rollout = sample(emu3)
    h, w = emu3.height, emu3.width
    assert (h, w) == (4, 4) and emu3.num_completion_tokens == h * (w + 1) + 3 and emu3.image_size == 8
    ids = rollout.completion_ids
    tok = emu3.processor.tokenizer
    eol, eof, eoi = (tok.convert_tokens_to_ids(t) for t in ("<|extra_200|>", "<|extra_201|>", "<|image end|>"))
    structural = torch.zeros(ids.shape[1], dtype=torch.bool)
    structural[[r * (w + 1) + w for r in range(h)]] = True
    structural[-3:] = True
    assert (ids[:, structural][:, :h] == eol).all()
    assert ids[:, -3:].tolist() == [[eof, eoi, tok.eos_token_id]] * len(rollout)
    visual = set(emu3.model.vocabulary_mapping.image_tokens)
    assert all(t in visual for t in ids[:, ~structural].flatten().tolist())
    # action mask is False exactly on the structural tokens, and they carry log-prob 0 when sampled and scored
    assert torch.equal(rollout.action_mask, (~structural).expand_as(ids))
    assert (rollout.logprobs[:, structural] == 0).all() and (rollout.logprobs[:, ~structural] < 0).all()
    with torch.no_grad():
        for mode in ("mixture", "conditional"):
            scored, entropy = emu3.token_logprobs(rollout, mode, return_entropy=True)
            assert (scored[:, structural] == 0).all() and (entropy[:, structural] == 0).all()
            assert (scored[:, ~structural] < 0).all() and (entropy[:, ~structural] > 0).all()


def test_restricted_head_equals_the_full_lm_head_columns_and_the_release_cfg(emu3):
    rollout = sample(emu3, cfg_scale=3.0)
    free = emu3.free_positions
    columns = slice(emu3.visual_start, emu3.visual_start + emu3.num_codes)
    negative = (rollout.extras["negative_ids"], rollout.extras["negative_mask"])
    with torch.no_grad():
        full_c = full_vocab_logits(emu3, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids)[:, free]
        full_u = full_vocab_logits(emu3, *negative, rollout.completion_ids)[:, free]
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids[:, :-1]], dim=1)
        mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids[:, :-1])], dim=1)
        hidden = emu3.hidden_states(ids, mask, position_ids_from_mask(mask))
        restricted = emu3.visual_logits(hidden[:, rollout.prompt_ids.shape[1] - 1 + free])
        assert full_c.shape[-1] > restricted.shape[-1] == emu3.num_codes
        torch.testing.assert_close(restricted, full_c[..., columns], atol=1e-5, rtol=1e-5)
        # the release's CFG: s (logsm c - logsm u) + logsm u over the visual tokens (the prefix constraint's set)
        c, u = full_c[..., columns].log_softmax(-1), full_u[..., columns].log_softmax(-1)
        guided = (3.0 * (c - u) + u).log_softmax(-1)
        codes = rollout.completion_ids[:, free] - emu3.visual_start
        expected = guided.gather(-1, codes[..., None]).squeeze(-1)
        # rtol too: the scale 3 multiplies float32 rounding in c and u (the scorer's restricted head and this full
        # head sum in other orders); on an AVX2-only CPU one log-prob of -5.9 differed by 1.05e-5 (1.8e-6 relative)
        torch.testing.assert_close(emu3.token_logprobs(rollout, "mixture")[:, free], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rollout.logprobs[:, free], expected, atol=1e-4, rtol=0)
        conditional = c.gather(-1, codes[..., None]).squeeze(-1)
        torch.testing.assert_close(emu3.token_logprobs(rollout, "conditional")[:, free], conditional,
                                   atol=1e-5, rtol=0)


def test_chunked_scoring_and_gradient_checkpointing_change_nothing():
    policy = policies.build("emu3", tiny=True, seed=1)
    policy.add_lora(r=4, alpha=8)
    rollout = sample(policy)
    lora = [p for n, p in policy.model.named_parameters() if p.requires_grad]

    def logprobs_and_grads(chunk, checkpointing=False):
        policy.score_chunk_size = chunk
        if checkpointing:
            policy.enable_gradient_checkpointing()
            policy.model.train()
        logprobs = policy.token_logprobs(rollout, "mixture")
        grads = torch.autograd.grad((logprobs * rollout.action_mask).sum(), lora)
        policy.model.gradient_checkpointing_disable()
        policy.model.eval()
        return logprobs.detach(), grads

    whole, whole_grads = logprobs_and_grads(10_000)
    for chunk, checkpointing in ((1, False), (5, False), (3, True)):
        chunked, chunked_grads = logprobs_and_grads(chunk, checkpointing)
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)  # float noise of other shapes
        for a, b in zip(chunked_grads, whole_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in whole_grads)


def test_negative_prompt_header_choice_is_honoured_in_sampling_and_scoring(emu3, tmp_path):
    tok = emu3.processor.tokenizer
    header_end = tok.convert_tokens_to_ids("<|image token|>")
    no_header = Emu3Policy(emu3.model, emu3.processor, resolution=emu3.resolution, negative_prompt_header=False)
    with_ids, _ = emu3.encode_negative_prompt()
    without_ids, _ = no_header.encode_negative_prompt()
    assert with_ids[0, -1] == header_end and header_end not in without_ids[0].tolist()
    assert torch.equal(with_ids[0, : without_ids.shape[1]], without_ids[0])  # same text, header appended

    a, b = sample(emu3, seed=4), sample(no_header, seed=4)
    assert torch.equal(a.extras["negative_ids"][0], with_ids[0])
    assert torch.equal(b.extras["negative_ids"][0], without_ids[0])
    assert not torch.equal(a.logprobs, b.logprobs)
    with torch.no_grad():
        # each scores its own samples as sampled; scoring uses the negative rows stored in the rollout
        assert (no_header.token_logprobs(b) - b.logprobs)[b.action_mask].abs().max() <= 1e-4
        assert torch.equal(emu3.token_logprobs(b), no_header.token_logprobs(b))
        swapped = b.select(slice(None))
        swapped.extras = a.extras
        assert (no_header.token_logprobs(swapped) - b.logprobs)[b.action_mask].abs().max() > 1e-3

    # the choice (and the size) survive save_pretrained / build(model_name_or_path=...)
    no_header.save_pretrained(str(tmp_path))
    loaded = policies.build("emu3", model_name_or_path=str(tmp_path))
    assert loaded.negative_prompt_header is False and loaded.resolution == emu3.resolution
    assert policies.build("emu3", model_name_or_path=str(tmp_path), negative_prompt_header=True).negative_prompt_header


def test_resolution_sets_the_grid_and_bad_layouts_are_rejected(emu3):
    bigger = Emu3Policy(emu3.model, emu3.processor, resolution=48)
    assert (bigger.height, bigger.width, bigger.num_completion_tokens, bigger.image_size) == (6, 6, 45, 12)
    rollout = sample(emu3, group_size=1)
    ids, _ = bigger.encode_prompts(["a red image"])
    assert emu3.processor.tokenizer.decode(ids[0, -5:]) .replace(" ", "").startswith("<|imagestart|>6*6")
    with pytest.raises(ValueError, match="layout"):
        bigger.token_logprobs(rollout)
    broken = rollout.select(slice(None))
    broken.completion_ids = rollout.completion_ids.clone()
    broken.completion_ids[0, emu3.width] = broken.completion_ids[0, 0]  # a code where the EOL belongs
    with pytest.raises(ValueError, match="layout"):
        emu3.token_logprobs(broken)
    with pytest.raises(ValueError, match="resolution"):
        Emu3Policy(emu3.model, emu3.processor, resolution=4)


# -- think-then-draw ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planner():
    policy = policies.build("emu3", tiny=True)
    policy.set_plan(PlanSettings(max_tokens=6, temperature=1.5))
    return policy


def test_plans_never_write_image_tokens_and_the_image_keeps_the_forced_layout(planner):
    banned = set(planner.plan_banned_ids(planner.planner.end_marker_id()))
    tok = planner.processor.tokenizer
    structural = {planner.eol_id, planner.eof_id, planner.eoi_id, tok.bos_token_id, tok.pad_token_id,
                  tok.convert_tokens_to_ids("<|image token|>"), tok.convert_tokens_to_ids("<image>")}
    visual = set(planner.model.vocabulary_mapping.image_tokens)
    assert visual | structural <= banned
    assert planner.planner.end_marker_id() not in banned and planner.image_prefix_ids[0] not in banned
    assert len(banned) > len(tok) / 2  # most of the tiny vocabulary: an unbanned head would write them all the time

    plan_width = planner.plan.max_tokens
    rollout = sample(planner, group_size=8, seed=1)  # 16 plans at temperature 1.5
    written = planner.planner.plan_written(rollout.plan_ids)
    assert written.sum() >= 40
    assert not any(t in banned for t in rollout.plan_ids[written].tolist())
    # the image span is exactly the no-plan layout, forced tokens out of the action mask and at log-prob 0
    image = rollout.image_ids
    assert image.shape[1] == planner.num_image_tokens and rollout.num_plan_tokens == plan_width
    planner.check_image_tokens(image)
    free = (planner.forced_tokens < 0).expand_as(image)
    assert torch.equal(rollout.action_mask[:, plan_width:], free)
    assert (rollout.logprobs[:, plan_width:][~free] == 0).all() and (rollout.logprobs[:, plan_width:][free] < 0).all()
    assert all(image.size == (planner.image_size,) * 2 for image in planner.decode(rollout.select(slice(0, 2))))


def test_an_empty_plan_gives_the_release_prompt(planner):
    """A plan that writes <|image start|> at once leaves the image exactly where the release prompt puts it."""
    prompt_ids, prompt_mask = planner.planner.encode_plan_prompts(PROMPTS)
    release_ids, release_mask = planner.encode_prompts(PROMPTS)
    header = planner.image_prefix_ids
    assert release_ids[:, -len(header):].tolist() == [header] * len(PROMPTS)
    assert torch.equal(torch.cat([prompt_ids, release_ids[:, -len(header):]], 1), release_ids)

    planner.set_plan(None)
    try:
        plain = sample(planner, seed=2)
    finally:
        planner.set_plan(PlanSettings(max_tokens=6, temperature=1.5))
    pad = planner.plan_tokenizer.pad_token_id
    span = torch.full((len(plain), 6), pad)
    span[:, 0] = header[0]
    empty = plain.select(slice(None))
    empty.prompt_ids, empty.prompt_mask = (x.repeat_interleave(2, 0) for x in (prompt_ids, prompt_mask))
    empty.completion_ids, empty.num_plan_tokens = torch.cat([span, plain.completion_ids], 1), 6
    with torch.no_grad():
        scored = planner.token_logprobs(empty)
    torch.testing.assert_close(scored[:, 6:], plain.logprobs, atol=1e-4, rtol=0)
    assert (scored[:, 0] < 0).all() and (scored[:, 1:6] == 0).all()


def test_image_after_a_plan_matches_the_unpadded_sequence_and_the_release_cfg(planner):
    """Each row's image log-probs, as sampled, equal those of the model's own full forward over the compact
    sequence BOS + prompt + suffix + written plan (no end marker) + header, one row at a time, no padding, no
    holes; the unconditional branch is the release negative prompt, which does not see the plan."""
    rollout = sample(planner, cfg_scale=3.0, seed=16)  # plans that stop at EOS, at <|image start|>, and neither
    neg_ids, neg_mask = planner.encode_negative_prompt()
    assert torch.equal(rollout.extras["negative_ids"], neg_ids.expand(len(rollout), -1))
    written = planner.planner.plan_written(rollout.plan_ids)
    end, header = planner.planner.end_marker_id(), torch.tensor(planner.image_prefix_ids)
    free = planner.free_positions
    columns = slice(planner.visual_start, planner.visual_start + planner.num_codes)
    stops = set()
    for row in range(len(rollout)):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        plan = rollout.plan_ids[row][written[row]]
        plan = plan[plan != end]
        if len(plan) and plan[-1] == header[0]:  # the plan wrote <|image start|>: the header goes on from there
            stops.add("boi")
            plan = plan[:-1]
        else:
            stops.add("eos" if len(plan) < written[row].sum() else "none")
        context = torch.cat([prompt, plan, header])[None]
        image = rollout.image_ids[row : row + 1]
        with torch.no_grad():
            c = full_vocab_logits(planner, context, torch.ones_like(context), image)[:, free, columns]
            u = full_vocab_logits(planner, neg_ids, neg_mask, image)[:, free, columns]
        guided = (3.0 * (c.log_softmax(-1) - u.log_softmax(-1)) + u.log_softmax(-1)).log_softmax(-1)
        expected = guided.gather(-1, (image[:, free] - planner.visual_start)[..., None]).squeeze(-1)
        torch.testing.assert_close(rollout.logprobs[row : row + 1, planner.plan.max_tokens + free], expected,
                                   atol=1e-4, rtol=0)
    assert stops == {"eos", "boi", "none"} and (rollout.prompt_mask == 0).any()  # holes and padding to get wrong
