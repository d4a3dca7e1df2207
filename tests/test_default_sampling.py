"""Release sampling defaults per family: a setting left at None is the family's, an explicit value overrides it, and
the resolved values reach the run's config.json and the evaluation report."""

import json

import pytest
import torch

import policies
from conftest import PROMPTS
from grpo_img.config import load_config
from grpo_img.evaluate import main as evaluate_main
from grpo_img.trainer import train

# (cfg_scale, temperature) as each release samples its image tokens (top-k / top-p off for RL, see the families)
RELEASE = {"janus": (5.0, 1.0), "emu3": (3.0, 1.0), "chameleon": (3.0, 1.0), "blip3o_next": (1.0, 1.0),
           "seed_x": (1.0, 1.0)}


def test_every_family_has_its_release_defaults():
    assert set(RELEASE) == set(policies.available())
    for name, (cfg_scale, temperature) in RELEASE.items():
        settings = policies.policy_class(name).default_sampling
        assert (settings.cfg_scale, settings.temperature, settings.top_k, settings.top_p) == (cfg_scale, temperature,
                                                                                              0, 1.0)


def test_release_sampling_is_recorded_where_the_rl_default_differs():
    emu3, chameleon = policies.policy_class("emu3"), policies.policy_class("chameleon")
    assert (emu3.release_sampling.cfg_scale, emu3.release_sampling.top_k) == (3.0, 2048)
    assert (chameleon.release_sampling.temperature, chameleon.release_sampling.top_p) == (0.7, 0.9)
    blip3o = policies.policy_class("blip3o_next").release_sampling  # inference.py; its RL generate() is top-k 50
    assert (blip3o.temperature, blip3o.top_k, blip3o.top_p) == (1.0, 1200, 0.95)
    assert all(policies.policy_class(n).release_sampling is None for n in ("janus", "seed_x"))


def test_unset_settings_sample_the_family_default_and_given_ones_override(tiny_policy):
    generator = torch.Generator().manual_seed(0)
    default = tiny_policy.sample(PROMPTS, 2, generator=generator).sampling
    assert default == tiny_policy.default_sampling
    given = tiny_policy.sample(PROMPTS, 2, cfg_scale=2.0, top_k=7, generator=generator).sampling
    assert (given.cfg_scale, given.top_k, given.temperature) == (2.0, 7, tiny_policy.default_sampling.temperature)


def test_blip3o_next_evaluation_without_cfg_flag_samples_without_cfg_and_says_so(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red image\na blue image\n")
    common = ["--policy", "blip3o_next", "--policy-options", '{"tiny": true}', "--benchmark", "reward:color",
              "--prompts", str(prompts), "--num-images", "2", "--batch-prompts", "2"]
    report = evaluate_main(common + ["--out", str(tmp_path / "default")])
    assert report["sampling"]["cfg_scale"] == 1.0 and report["sampling"]["given"] == {}
    assert "Sampling: no CFG" in (tmp_path / "default" / "report.md").read_text()
    guided = evaluate_main(common + ["--out", str(tmp_path / "guided"), "--cfg-scale", "3"])
    assert guided["sampling"]["cfg_scale"] == 3.0 and guided["sampling"]["given"] == {"cfg_scale": 3.0}
    assert "Sampling: CFG 3.0" in (tmp_path / "guided" / "report.md").read_text()


@pytest.mark.slow
def test_the_run_config_holds_the_resolved_settings(tmp_path):
    config = load_config(None, {"policy": "blip3o_next", "policy_options": '{"tiny": true}', "cfg_scale": "null",
                                "max_steps": "1", "num_generations": "2", "per_device_train_batch_size": "6",
                                "output_dir": str(tmp_path / "run"), "report_to": "none",
                                "image_log_steps": "0", "save_steps": "0"})
    assert config.cfg_scale is None
    saved = json.loads((train(config) / "config.json").read_text())
    assert (saved["cfg_scale"], saved["temperature"], saved["top_k"], saved["top_p"]) == (1.0, 1.0, 0, 1.0)
