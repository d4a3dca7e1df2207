import math

import pytest
from PIL import Image

import rewards
from rewards.base import Reward, RewardContractError, RewardUnavailable, score_isolated
from rewards.color import COLORS


def solid(color, size=16):
    return Image.new("RGB", (size, size), COLORS[color])


def test_color_reward_scores_the_named_colour():
    reward = rewards.build("color", colors=["red", "green", "blue", "yellow"])
    half = Image.new("RGB", (10, 10), COLORS["red"])
    half.paste(Image.new("RGB", (5, 10), COLORS["blue"]), (0, 0))
    scores = reward([solid("red"), solid("blue"), half, half], ["a red image", "a red image", "a red image",
                                                                 "a blue image"], [{}] * 4)
    assert scores == [1.0, 0.0, 0.5, 0.5]
    assert reward([solid("green")], ["anything"], [{"color": "green"}]) == [1.0]
    with pytest.raises(ValueError, match="names none of the colours"):
        reward([solid("red")], ["a cat"], [{}])


class Constant(Reward):
    def __init__(self, value):
        self.value = value

    def __call__(self, images, prompts, metadata):
        return [self.value] * len(images)


def test_weighted_sum_logs_each_part():
    composite = rewards.WeightedSum({"a": (Constant(1.0), 0.5), "b": (Constant(2.0), 2.0)})
    assert composite([solid("red")] * 2, ["x", "y"], [{}, {}]) == [4.5, 4.5]
    assert composite.last_parts == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
    missing = rewards.WeightedSum({"a": (Constant(None), 1.0)})
    assert math.isnan(missing([solid("red")], ["x"], [{}])[0])


def test_build_composite_from_config_entries():
    composite = rewards.build_composite([{"name": "color", "weight": 2.0, "colors": ["red", "blue"]}])
    assert composite([solid("red")], ["a red image"], [{}]) == [2.0]
    with pytest.raises(ValueError, match="has no 'name'"):
        rewards.build_composite([{"weight": 1.0}])


class FailsOn(Reward):
    """Scores 1.0, raises on prompts containing `word`."""

    def __init__(self, word):
        self.word = word

    def __call__(self, images, prompts, metadata):
        if any(self.word in p for p in prompts):
            raise RuntimeError(f"cannot score {self.word}")
        return [1.0] * len(images)


class Returns(Reward):
    def __init__(self, values):
        self.values = values

    def __call__(self, images, prompts, metadata):
        return self.values


def test_a_failing_part_costs_only_its_samples_and_is_counted():
    composite = rewards.WeightedSum({"a": (FailsOn("cat"), 1.0), "b": (FailsOn("dog"), 2.0)})
    scores = composite([solid("red")] * 3, ["a cat", "a dog", "a car"], [{}] * 3)
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == 3.0
    assert composite.last_failures == {"a": 1, "b": 1}
    assert composite.last_parts["a"][1] == 1.0 and math.isnan(composite.last_parts["a"][0])


@pytest.mark.parametrize("values, message", [
    ([1.0], "returned 1 scores for 2 images"),
    ([1.0, "0.5"], r"returned '0.5' \(str\) for sample 1"),
    ([True, 1.0], r"returned True \(bool\) for sample 0"),
    ([1.0, [0.5]], r"returned \[0.5\] \(list\)"),
])
def test_contract_breaches_are_a_clear_error_not_a_failure(values, message):
    from rewards.base import score_with_isolation

    composite = rewards.WeightedSum({"bad": (Returns(values), 1.0)})
    with pytest.raises(RewardContractError, match=message):
        composite([solid("red")] * 2, ["x", "y"], [{}, {}])
    with pytest.raises(RewardContractError, match=message):
        score_with_isolation(Returns(values), [solid("red")] * 2, ["x", "y"], [{}, {}])


def test_numbers_of_any_kind_are_scores():
    import numpy as np
    import torch

    scores, errors = score_isolated(Returns([np.float32(0.5), torch.tensor(0.25), 1, None, float("inf")]),
                                    [solid("red")] * 5, ["x"] * 5, [{}] * 5)
    assert scores[:3] == [0.5, 0.25, 1.0] and math.isnan(scores[3]) and math.isnan(scores[4])
    assert errors[:3] == [None] * 3 and errors[3] and errors[4]


def test_unavailable_reward_leaves_the_batch_unscored_without_retrying_each_sample():
    class Down(Reward):
        calls = 0

        def __call__(self, images, prompts, metadata):
            Down.calls += 1
            raise RewardUnavailable("server down")

    scores, errors = score_isolated(Down(), [solid("red")] * 4, ["x"] * 4, [{}] * 4)
    assert all(math.isnan(s) for s in scores) and all("server down" in e for e in errors)
    assert Down.calls == 1


def test_plan_color_scores_the_plan_words_that_name_the_prompts_colour():
    reward = rewards.build("plan_color")
    plans = [{"plan": "red red"}, {"plan": "a red car"}, {"plan": "blue"}, {"plan": ""}]
    assert reward([None] * 4, ["a red image"] * 4, plans) == [1.0, pytest.approx(1 / 3), 0.0, 0.0]
    with pytest.raises(ValueError, match="plan: true"):
        reward([None], ["a red image"], [{}])
