"""Think-then-draw: a text plan, then the image conditioned on prompt + plan (policies/plan.py), on every tiny policy
that can write one (every family that implements the text hooks is picked up automatically), and GRPO runs whose reward depends
on the plan."""

import json

import pytest
import torch

import policies
import rewards
from conftest import PROMPTS, reward_rise, run_tiny_grpo
from policies.plan import PlanSettings
from rewards.base import Reward
from rewards.color import COLORS

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
    rollout = sample(planner)
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


class PlanNamesColours(Reward):
    """Depends only on the plan: the fraction of its (up to 4) words that are colour names."""

    def __call__(self, images, prompts, metadata):
        return [sum(word in COLORS for word in meta["plan"].split()) / 4 for meta in metadata]


@pytest.mark.slow
def test_grpo_on_a_plan_reward_rises_for_seed_x(tmp_path, monkeypatch):
    """SEED-X's only choice is its plan; GRPO on a reward that reads the plan learns to write colour names."""
    monkeypatch.setitem(rewards.REGISTRY, "plan_colours", f"{__name__}:PlanNamesColours")
    metrics = run_tiny_grpo(tmp_path, "seed_x", {"tiny": True}, 10, rewards=[{"name": "plan_colours"}],
                            prompts=["a red image", "a blue image"], plan="true", plan_max_tokens="4",
                            num_generations="8", per_device_train_batch_size="16", learning_rate="0.01", beta="0",
                            lora_r="8", lora_alpha="16", cfg_scale="1.0", image_log_steps="5")
    first, last = reward_rise(metrics, 3)
    assert last >= first + 0.3, f"reward_mean went {first:.3f} -> {last:.3f}"
    logged = [json.loads(line) for line in (tmp_path / "run" / "plans.jsonl").read_text().splitlines()]
    assert {entry["step"] for entry in logged} == {1, 5, 10} and len(logged) == 3 * 16
    assert all(entry["image"].startswith("images/step_") for entry in logged)
    final = [entry for entry in logged if entry["step"] == 10]
    assert sum(entry["reward"] for entry in final) / len(final) == pytest.approx(
        sum(sum(w in COLORS for w in entry["plan"].split()) / 4 for entry in final) / len(final))


def test_janus_trains_plan_and_image_through_the_trainer(tmp_path):
    metrics = run_tiny_grpo(tmp_path, "janus", {"tiny": True}, 2, prompts=["a red image"],
                            per_device_train_batch_size="8", plan="true", plan_max_tokens="4",
                            plan_temperature="1.2", image_log_steps="1")
    assert all(m["loss"] == m["loss"] for m in metrics) and metrics[0]["logprob_gap"] < 1e-4
    assert metrics[0]["kl"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "plans.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1] * 8 + [2] * 8
