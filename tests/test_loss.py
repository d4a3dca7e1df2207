"""GRPO arithmetic against values computed by hand, one loop at a time."""

import math

import pytest
import torch

from grpo_img.loss import (LossNormalizer, LossSettings, group_advantages, grpo_loss, normalize_then_sum_advantages,
                           zero_variance_groups)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    adv = group_advantages(rewards, group_size=2, scale_rewards="group")
    # group 0: mean 0.5, std (Bessel) sqrt(0.5); group 1: zero std -> 0; group 2: mean 3, std sqrt(2)
    expected = [0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4), 0.0, 0.0,
                -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    none = group_advantages(rewards, 2, "none")
    assert torch.allclose(none, torch.tensor([0.5, -0.5, 0, 0, -1, 1.0]))
    batch = group_advantages(rewards, 2, "batch")
    assert torch.allclose(batch, none / (rewards.std() + 1e-4), atol=1e-6)


def test_unscored_samples_leave_their_group():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 0.0])
    adv = group_advantages(rewards, group_size=4, scale_rewards="none")
    assert torch.allclose(adv, torch.tensor([-1 / 3, 0.0, 5 / 3, -4 / 3]), atol=1e-6)


def test_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def hand_loss(logp, old, ref, adv, mask, loss_type, eps, eps_high, beta):
    """The loss written as plain loops over sequences and tokens."""
    per_seq, all_terms = [], []
    for i in range(len(logp)):
        terms = []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            term = -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        per_seq.append(sum(terms) / max(len(terms), 1))
        all_terms += terms
    n, t_len = len(logp), len(logp[0])
    if loss_type == "grpo":
        return sum(per_seq) / n
    if loss_type in ("bnpo", "dapo"):
        return sum(all_terms) / len(all_terms)
    if loss_type == "dr_grpo":
        return sum(all_terms) / (n * t_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_hand_computation(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g) * 3
    old = logp + torch.randn(3, 5, generator=g) * 0.3  # ratios far enough from 1 to clip
    ref = logp + torch.randn(3, 5, generator=g) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    norm = LossNormalizer(sequences=3, tokens=float(mask.sum()), micro_batches=1, completion_length=5)
    settings = LossSettings(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta)
    loss, stats = grpo_loss(logp, old, adv, mask, settings=settings, norm=norm, ref_logprobs=ref)
    expected = hand_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), loss_type,
                         0.2, 0.28, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert stats["tokens"].item() == mask.sum().item()
    assert 0 < stats["clipped_sum"].item() < mask.sum().item()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_whole_window(loss_type):
    """Gradient accumulation: the window's micro-batch losses sum to the loss of one big batch (bnpo excepted,
    which by definition averages per-micro-batch token means)."""
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    kw = dict(settings=LossSettings(loss_type=loss_type, epsilon=0.2))
    whole, _ = grpo_loss(logp, old, adv, mask, norm=LossNormalizer(4, float(mask.sum()), 1, 6), **kw)
    split = LossNormalizer(4, float(mask.sum()), 2, 6)
    parts = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], norm=split, **kw)[0] for s in (slice(0, 2), slice(2, 4)))
    if loss_type == "bnpo":
        halves = [grpo_loss(logp[s], old[s], adv[s], mask[s], norm=LossNormalizer(2, 0, 1, 6), **kw)[0]
                  for s in (slice(0, 2), slice(2, 4))]
        assert parts.item() == pytest.approx(sum(halves).item() / 2, rel=1e-6)
    else:
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_ratio_one_gives_the_policy_gradient():
    """On-policy (old = current, detached) the gradient of the loss is -A * grad log p, per token, averaged."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool),
                        settings=LossSettings(loss_type="grpo"), norm=LossNormalizer(1, 2, 1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))


def test_zero_variance_groups_look_at_the_scored_samples_only():
    nan = float("nan")
    rewards = torch.tensor([nan, nan, nan,   # nothing scored: no signal
                            0.5, 0.5, nan,   # equal scores and one unscored: no signal
                            0.5, 0.7, nan,   # two different scores: signal
                            1.0, nan, nan,   # one scored sample: no signal
                            0.3, 0.3 + 1e-8, 0.3])  # equal within the tolerance
    assert zero_variance_groups(rewards, 3).tolist() == [True, True, False, True, True]


def test_batch_scaling_uses_the_std_of_every_process():
    """Two 'processes' holding half the groups each: with their totals summed, each half's advantages are those
    of the whole batch; scaled by its own half's std they would not be."""
    rewards = torch.tensor([0.1, 0.9, 0.5, float("nan"), 2.0, 3.0, 0.0, 0.2])
    whole = group_advantages(rewards, 2, "batch")
    halves = rewards[:4], rewards[4:]

    def reduce_with(other):
        from grpo_img.loss import batch_moments  # the totals the other process contributes

        def reduce(totals):
            x = other[~torch.isnan(other)].double()
            return totals + torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(len(x)), dtype=torch.float64)])
        return reduce

    first = group_advantages(halves[0], 2, "batch", reduce_with(halves[1]))
    second = group_advantages(halves[1], 2, "batch", reduce_with(halves[0]))
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-6)
    assert not torch.allclose(group_advantages(halves[0], 2, "batch"), first, atol=1e-3)
    assert torch.allclose(whole, (rewards.view(-1, 2) - torch.nanmean(rewards.view(-1, 2), 1, keepdim=True))
                          .view(-1).nan_to_num(0.0) / (rewards[~torch.isnan(rewards)].std() + 1e-4), atol=1e-6)


def test_normalize_then_sum_by_hand():
    """GDPO: each part normalised in its group, weighted sum, then normalised over the batch."""
    parts = torch.tensor([[1.0, 10.0], [3.0, 30.0], [0.0, 5.0], [2.0, 5.0]])
    weights = torch.tensor([1.0, 0.5])
    adv = normalize_then_sum_advantages(parts, weights, 2)
    s2 = math.sqrt(2)  # the Bessel std of two values 2 apart
    per_part = [[-1 / (s2 + 1e-4), -10 / (10 * s2 + 1e-4)], [1 / (s2 + 1e-4), 10 / (10 * s2 + 1e-4)],
                [-1 / (s2 + 1e-4), 0.0], [1 / (s2 + 1e-4), 0.0]]
    summed = torch.tensor([a + 0.5 * b for a, b in per_part])
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-5)
    # a sample that one part could not score is unscored: advantage 0, left out of the statistics
    parts[1, 0] = float("nan")
    adv = normalize_then_sum_advantages(parts, weights, 2)
    assert adv[1] == 0 and adv[2] != 0
