"""Bad input gets a clear error: unknown keys and names, impossible batch geometry, missing or empty prompts."""

import json

import pytest

import policies
import rewards
from grpo_img.config import load_config
from grpo_img.data import PromptSchedule, load_prompts
from grpo_img.train import parse_args


def test_demo_config_loads_and_overrides_apply():
    config = load_config(None, {"max_steps": "7", "output_dir": "x/y", "beta": "0.02", "epsilon_high": "null"})
    assert config.max_steps == 7 and config.output_dir == "x/y" and config.beta == 0.02
    assert config.epsilon_high is None and config.policy == "janus"


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prompts: [a red image]\nlearning_rate: 1e-5\nbeta: 4e-2\n")
    config = load_config(path, {"image_heads_learning_rate": "1e-3"})
    assert (config.learning_rate, config.beta, config.image_heads_learning_rate) == (1e-5, 0.04, 1e-3)
    with pytest.raises(ValueError, match="'max_steps' must be a number, got 'many'"):
        load_config(path, {"max_steps": "many"})


def test_unknown_config_key_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy: janus\nprompts: [a red image]\nnum_generation: 4\n")
    with pytest.raises(ValueError, match="unknown config key 'num_generation'.*did you mean 'num_generations'"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        load_config(None, {"lerning_rate": "1"})


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize("overrides,message", [
    ({"num_generations": "1"}, "num_generations must be >= 2"),
    ({"num_generations": "5"}, "multiple of num_generations"),
    ({"loss_type": "ppo"}, "loss_type must be one of"),
    ({"scale_rewards": "yes"}, "scale_rewards must be one of"),
    ({"cfg_mode": "both"}, "cfg_mode must be"),
    ({"policy": "dalle"}, "unknown policy 'dalle'; available: .*janus"),
    ({"rewards": '[{"name": "clipp"}]'}, "unknown reward 'clipp'"),
    ({"rewards": '[{"name": "nope.module:Reward"}]'}, "cannot import 'nope.module'"),
    ({"policy": "rewards.color:ColorReward"}, "not a subclass of policies.base.Policy"),
    # every field typed strictly and in range, before anything is built
    ({"max_grad_norm": "0"}, "max_grad_norm: must be > 0"),
    ({"max_grad_norm": "-1"}, "max_grad_norm: must be > 0"),
    ({"learning_rate": "0"}, "learning_rate: must be > 0"),
    ({"learning_rate": "true"}, "learning_rate: input should be a valid number"),
    ({"plan": "maybe"}, "plan: input should be a valid boolean"),
    ({"max_steps": "2.5"}, "max_steps: input should be a valid integer"),
    ({"epsilon": "-0.1"}, "epsilon must be a number > 0"),
    ({"beta": "-0.01"}, "beta: must be >= 0"),
    ({"warmup_steps": "-1"}, "warmup_steps: must be >= 0"),
    ({"save_steps": "-5"}, "save_steps: must be >= 0"),
    ({"adam_beta2": "1.0"}, "adam_beta2: must be in \\[0, 1\\)"),
    ({"learning_rate": ".nan"}, "learning_rate: must be a finite number"),
    ({"rewards": '[{"name": "color", "weight": .nan}]'}, "the weight of 'color' must be a finite number"),
    ({"delta": "0.5"}, "delta must be a number > 1"),
    ({"top_entropy_quantile": "1.5"}, "top_entropy_quantile must be in"),
])
def test_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_command_line_parsing():
    args, overrides = parse_args(["--config", "c.yaml", "--output_dir", "o", "--beta=0.1", "--resume"])
    assert args.config == "c.yaml" and args.resume == "latest"
    assert overrides == {"output_dir": "o", "beta": "0.1"}


def test_prompt_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red image\n\n  a blue image \n")
    assert [r.prompt for r in load_prompts(str(txt))] == ["a red image", "a blue image"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a cat", "tag": "single_object", "include": [{"class": "cat"}]}) + "\n")
    (record,) = load_prompts(str(jsonl))
    assert record.prompt == "a cat" and record.metadata["tag"] == "single_object"
    assert [r.prompt for r in load_prompts(["x", {"prompt": "y", "k": 1}])] == ["x", "y"]


def test_prompt_source_from_a_datasets_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"caption": ["a red image", "a green image"], "k": [1, 2]}).save_to_disk(str(tmp_path / "d"))
    records = load_prompts(f"hf:{tmp_path / 'd'}", prompt_column="caption")
    assert [r.prompt for r in records] == ["a red image", "a green image"] and records[1].metadata == {"k": 2}


def test_bad_prompt_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(str(empty))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="b.jsonl:2: not valid JSON"):
        load_prompts(str(broken))
    with pytest.raises(ValueError, match="no 'prompt' text"):
        load_prompts([{"caption": "x"}])


def test_prompt_schedule_is_deterministic_and_splits_ranks():
    records = load_prompts([f"p{i}" for i in range(10)])
    a = [r.prompt for r in PromptSchedule(records, 3, seed=1).at_step(4)]
    assert a == [r.prompt for r in PromptSchedule(records, 3, seed=1).at_step(4)]
    rank0 = [r.prompt for r in PromptSchedule(records, 2, 1, rank=0, world_size=2).at_step(0)]
    rank1 = [r.prompt for r in PromptSchedule(records, 2, 1, rank=1, world_size=2).at_step(0)]
    assert not set(rank0) & set(rank1)
    epoch = [r.prompt for s in range(5) for r in PromptSchedule(records, 2, seed=1).at_step(s)]
    assert sorted(epoch) == sorted(f"p{i}" for i in range(10))  # every prompt once per epoch


def test_unknown_reward_names_and_options():
    with pytest.raises(ValueError, match="unknown reward 'clipp'"):
        rewards.build("clipp")
    with pytest.raises(ValueError, match="unknown option"):
        rewards.build("color", colours=["red"])
    with pytest.raises(ValueError, match="unknown colour"):
        rewards.build("color", colors=["mauve"])


def test_every_shipped_config_loads_and_real_models_train_on_real_rewards():
    from grpo_img.config import shipped_configs_dir

    demo_rewards = {"color", "plan_color"}
    configs = sorted(shipped_configs_dir().glob("*.yaml"))
    assert len(configs) == 13  # 8 real-model configs and 5 tiny ones, one per family
    for path in configs:
        config = load_config(path.stem)  # by name, as an installed package finds it
        names = {entry["name"] for entry in config.rewards}
        if config.policy_options.get("tiny"):
            assert path.stem.endswith("tiny_demo") or path.stem == "demo_tiny", path.name
        else:
            assert not names & demo_rewards, f"{path.name} trains a real model on the demo reward {names}"


def test_unknown_config_names_list_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="shipped configs, by name: .*janus_pro_7b"):
        load_config("janus_pro_8b")


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as error:
        load_config(None, {"learning_rate": "-1", "max_grad_norm": "0", "plan": "perhaps"})
    assert str(error.value).count("\n") == 3 and "learning_rate" in str(error.value) and "plan" in str(error.value)


@pytest.mark.parametrize("name,text", [
    ("prompts.json", '["a red image", {"prompt": "a blue image", "color": "blue"}]'),
    ("prompts.yaml", "- a red image\n- {prompt: a blue image, color: blue}\n"),
])
def test_json_and_yaml_prompt_files_are_lists(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    records = load_prompts(str(path))
    assert [r.prompt for r in records] == ["a red image", "a blue image"] and records[1].metadata == {"color": "blue"}
    path.write_text('{"prompt": "not a list"}' if name.endswith("json") else "prompt: not a list\n")
    with pytest.raises(ValueError, match="expected a list of prompts"):
        load_prompts(str(path))


def test_unknown_prompt_file_formats_are_refused(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red image\n")
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        load_prompts(str(path))


def test_help_lists_every_config_key_with_its_default():
    from grpo_img.config import FIELDS, config_help

    text = config_help()
    for name in FIELDS:
        assert f"--{name} (default " in text, name
    assert "--beta (default 0.0)" in text and "--loss_type (default \"dapo\"): grpo | dr_grpo" in text


def my_scoring_function(images, prompts, metadata):
    """A custom reward as a plain function (used by the test below, by its import path)."""
    return [float(len(p)) for p in prompts]


def test_custom_rewards_and_policies_by_import_path():
    import rewards
    from PIL import Image

    reward = rewards.build("test_config_and_data:my_scoring_function")
    assert reward([Image.new("RGB", (4, 4))] * 2, ["ab", "abc"], [{}, {}]) == [2.0, 3.0]
    colour = rewards.build("rewards.color:ColorReward", colors=["red"])  # a Reward class by path, with options
    assert colour([Image.new("RGB", (4, 4), (255, 0, 0))], ["a red image"], [{}]) == [1.0]
    with pytest.raises(ValueError, match="takes no options"):
        rewards.build("test_config_and_data:my_scoring_function", scale=2)
    config = load_config(None, {"rewards": '[{"name": "test_config_and_data:my_scoring_function"}]',
                                "policy": "policies.janus:JanusPolicy"})
    assert policies.policy_class(config.policy).name == "janus"


def test_the_command_line_reports_bad_input_in_one_line_before_building(tmp_path, capsys):
    """Config, prompt-file and output-folder problems end the command with one message, not a traceback."""
    from grpo_img.train import main

    for argv, message in (
        (["--learning_rate", "true"], "config error: invalid config:\n  learning_rate: input should be a valid number"),
        (["--prompts", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "a")],
         "error: prompt file not found"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert str(exit_.value).startswith(message), exit_.value
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="error: output_dir .* is not empty"):
        main(["--output_dir", str(tmp_path / "used"), "--policy_options", '{"tiny": true}'])
