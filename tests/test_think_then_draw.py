"""Think-then-draw: a text plan, then the image conditioned on prompt + plan (policies/plan.py), on every tiny policy
that can write one (every family that implements the text hooks is picked up automatically). Training with a plan:
tests/test_families_train.py."""

import pytest
import torch

import policies
from conftest import PROMPTS
from policies.plan import PlanSettings

PLAN = PlanSettings(max_tokens=6, temperature=1.3)
PLAN_FAMILIES = [name for name in policies.available() if policies.build(name, tiny=True).plan_refusal is None]


@pytest.fixture(scope="module", params=PLAN_FAMILIES)
def planner(request):
    """A tiny policy of each family that writes plans."""
    policy = policies.build(request.param, tiny=True)
    policy.set_plan(PLAN)
    return policy


def free_image_tokens(policy) -> bool:
    return policy.free_image_tokens


def sample(policy, seed=0, group_size=3, **settings):
    settings = {"cfg_scale": 3.0, **settings}
    return policy.sample(PROMPTS, group_size, generator=torch.Generator().manual_seed(seed), **settings)


def test_rollout_layout_and_action_mask(planner):
    rollout = sample(planner, seed=1)
    plan_width = PLAN.max_tokens
    image_tokens = planner.num_image_tokens
    assert rollout.num_plan_tokens == plan_width and planner.num_completion_tokens == plan_width + image_tokens
    assert rollout.completion_ids.shape == (6, plan_width + image_tokens)
    written = planner.planner.plan_written(rollout.plan_ids)
    assert torch.equal(rollout.action_mask[:, :plan_width], written)
    assert rollout.action_mask[:, plan_width:].any() == free_image_tokens(planner)
    assert written[:, 0].all()  # every plan wrote something
    if planner.name == "janus":  # at this seed some tiny Janus plans stop early, which exercises the padding below
        assert (~written).any()
    stops = torch.isin(rollout.plan_ids, planner.planner.plan_stop_ids())
    for row in range(len(rollout)):  # a stopped plan's last written token is its stop token, then only padding
        n = int(written[row].sum())
        if n < plan_width:
            assert stops[row, n - 1] and (rollout.plan_ids[row, n:] == planner.plan_tokenizer.pad_token_id).all()
        assert not stops[row, : n - 1].any()
    assert len(rollout.plans) == 6 and all(isinstance(p, str) for p in rollout.plans)
    assert rollout.select(torch.tensor([4, 1])).plans == [rollout.plans[4], rollout.plans[1]]
    # which spans are actions is configurable
    for train_plan, train_image in ((False, True), (True, False)):
        planner.set_plan(PlanSettings(max_tokens=6, temperature=1.3, train_plan=train_plan, train_image=train_image))
        try:
            other = sample(planner)
        finally:
            planner.set_plan(PLAN)
        assert other.action_mask[:, :plan_width].any() == train_plan
        assert other.action_mask[:, plan_width:].any() == (train_image and free_image_tokens(planner))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_logprobs_are_consistent_over_both_spans(planner, cfg_scale):
    rollout = sample(planner, cfg_scale=cfg_scale)
    with torch.no_grad():
        scored, entropy = planner.token_logprobs(rollout, "mixture", return_entropy=True)
    mask = rollout.action_mask
    assert (scored - rollout.logprobs)[mask].abs().max() <= 1e-4
    assert (scored[:, :PLAN.max_tokens][~mask[:, :PLAN.max_tokens]] == 0).all()
    assert entropy.shape == scored.shape and (entropy[mask] > 0).all()


def test_plan_scores_do_not_depend_on_batch_padding(planner):
    rollout = sample(planner)
    alone = planner.sample(PROMPTS[:1], 1, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    in_batch = rollout.select(torch.tensor([0]))
    in_batch.completion_ids = alone.completion_ids
    assert (in_batch.prompt_mask == 0).any()
    with torch.no_grad():
        assert (planner.token_logprobs(alone) - planner.token_logprobs(in_batch)).abs().max() <= 1e-4


def test_the_image_is_conditioned_on_the_plan(planner):
    if not free_image_tokens(planner):
        pytest.skip(f"{planner.name}'s image tokens are forced: their log-probs are 0 whatever the plan")
    rollout = sample(planner, cfg_scale=1.0)
    swapped = rollout.select(torch.arange(len(rollout)))
    plans = rollout.plan_ids.flip(0)  # other plans, same prompts' rows (0..2 and 3..5 swap)
    swapped.completion_ids = torch.cat([plans, rollout.image_ids], dim=1)
    with torch.no_grad():
        image_a = planner.token_logprobs(rollout)[:, PLAN.max_tokens:]
        image_b = planner.token_logprobs(swapped)[:, PLAN.max_tokens:]
    assert (image_a - image_b).abs().max() > 1e-3


def test_image_context_masks_the_end_marker_and_a_repeated_begin_of_image(planner):
    tok = planner.plan_tokenizer
    red, blue = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("blue")
    eos, pad, boi = planner.planner.end_marker_id(), tok.pad_token_id, planner.image_prefix_ids[0]
    assert tok.unk_token_id not in (red, blue), "the tiny tokenizer must know 'red' and 'blue'"
    span = torch.tensor([[red, eos, pad, pad, pad, pad], [red, blue, boi, pad, pad, pad],
                         [red] * 6])
    prompt_ids, prompt_mask = torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    ids, mask = planner.planner.plan_context(prompt_ids, prompt_mask, span)
    prefix = len(planner.image_prefix_ids)
    assert ids[:, 8:9].tolist() == [[boi]] * 3 and ids[:, 8:].tolist() == [planner.image_prefix_ids] * 3
    tail = [1] * (prefix - 1)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 1] + tail,  # end marker and padding out, BOI appended
                             [1, 1, 1, 1, 1, 0, 0, 0, 0] + tail,  # the plan wrote BOI: no second one
                             [1, 1, 1, 1, 1, 1, 1, 1, 1] + tail]  # ran to max_tokens
    assert planner.planner.plan_written(span).sum(1).tolist() == [2, 3, 6]


def test_plan_settings_and_families_are_checked(planner):
    with pytest.raises(ValueError, match="{prompt}"):
        PlanSettings(instruction="draw it")
    with pytest.raises(ValueError, match="max_tokens"):
        PlanSettings(max_tokens=0)
    with pytest.raises(ValueError, match="not a token"):
        planner.set_plan(PlanSettings(end_marker="<no_such_token>"))
    planner.set_plan(PLAN)


def _all_done_on_two_processes(rank: int, init: str, results) -> None:
    import torch.distributed as dist

    from policies.plan import all_done

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = torch.tensor([True, True]) if rank == 0 else torch.tensor([True, False])
        results[rank] = (all_done(mine, lockstep=True), all_done(mine, lockstep=False))
    finally:
        dist.destroy_process_group()


def test_plan_sampling_stops_together_in_lockstep(tmp_path):
    """Under FSDP every forward is a collective: a process whose plans are all done must keep stepping while another
    process's are not (it would otherwise leave that one waiting in its next forward forever)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_all_done_on_two_processes, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
    assert results[0] == (False, True)  # done here, not everywhere: keep stepping in lockstep
    assert results[1] == (False, False)
