import math

import pytest
from PIL import Image

import rewards
from rewards.base import Reward
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
