"""Export (`python -m grpo_img.export`): the merged model, loaded back through the family's loading code with no
adapter, samples exactly the tokens that base + adapter sampled with the same seed (fp32, tiny models, every
family), and the folder carries a model card."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policies
from conftest import PROMPTS, build_tiny
from grpo_img.config import load_config
from grpo_img.evaluate import load_policy
from grpo_img.export import export_merged, load_exported, main as export_main

ROOT = Path(__file__).resolve().parents[1]


def sample(policy, seed=0):
    return policy.sample(PROMPTS, 3, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0,
                         generator=torch.Generator().manual_seed(seed))


def trained_adapter(policy_name: str, base_dir: Path, adapter_dir: Path) -> None:
    """An adapter as training leaves one: LoRA B non-zero (a fresh adapter is the identity) and the image heads,
    trained in full, moved away from the base's."""
    policy = policies.build(policy_name, model_name_or_path=str(base_dir))
    policy.add_lora(r=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    policy.peft_model.save_pretrained(str(adapter_dir))


def test_the_exported_model_samples_the_tokens_of_base_plus_adapter(policy_name, tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "export"
    build_tiny(policy_name, seed=3).save_pretrained(str(base_dir))
    trained_adapter(policy_name, base_dir, adapter_dir)
    config = load_config(None, {"policy": policy_name,
                                "policy_options": json.dumps({"model_name_or_path": str(base_dir)})})

    with_adapter = load_policy(policy_name, {"model_name_or_path": str(base_dir)}, str(adapter_dir))
    base = policies.build(policy_name, model_name_or_path=str(base_dir))
    export_merged(config, adapter_dir, out)
    exported = policies.build(policy_name, model_name_or_path=str(out))  # the family's loader, no adapter
    assert load_exported(out).name == policy_name
    for policy in (with_adapter, base, exported):
        policy.set_plan(build_tiny(policy_name).plan)  # SEED-X's only free choice is its plan

    expected = sample(with_adapter)
    got = sample(exported)
    assert torch.equal(got.completion_ids, expected.completion_ids)
    with torch.no_grad():
        assert torch.allclose(exported.token_logprobs(expected), with_adapter.token_logprobs(expected), atol=1e-5)
        # the adapter matters: the base scores the same tokens differently (so equality above is the merge's doing)
        assert (base.token_logprobs(expected) - with_adapter.token_logprobs(expected)).abs().max() > 1e-3
    assert not any("lora" in name for name, _ in exported.model.named_parameters())
    card = (out / "README.md").read_text()
    assert str(base_dir) in card and "`color`" in card and f'policies.build("{policy_name}"' in card


def test_the_export_command_writes_a_model_card_with_the_runs_steps_and_refuses_a_used_folder(tmp_path):
    from grpo_img.trainer import train

    run = tmp_path / "run"
    train(load_config(None, {"output_dir": str(run), "max_steps": "2", "save_steps": "0", "image_log_steps": "0",
                             "report_to": "none", "eval_steps": "2", "eval_prompts": '["a red image"]',
                             "eval_num_images": "2"}))
    command = [sys.executable, "-m", "grpo_img.export", "--config", str(run / "config.json"), "--adapter",
               str(run / "adapter"), "--out", str(tmp_path / "export")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    card = (tmp_path / "export" / "README.md").read_text()
    assert "**Steps:** 2," in card and "Last evaluation (step 2)" in card and "| eval/color |" in card
    assert "janus tiny (random weights" in card
    # the tiny palette's fitted decoder is in the folder: the exported model decodes like the trained one
    exported = load_exported(tmp_path / "export")
    trained = load_policy("janus", {"tiny": True, "tiny_palette": ["red", "green", "blue"]}, str(run / "adapter"))
    rollout = sample(trained)
    assert [im.tobytes() for im in exported.decode(rollout)] == [im.tobytes() for im in trained.decode(rollout)]
    # the command refuses the used folder (its own main, in process: the same code without another interpreter start)
    with pytest.raises(SystemExit, match="is not empty"):
        export_main(command[3:])


def test_export_refuses_a_folder_without_an_adapter(tmp_path):
    config = load_config(None, {})
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        export_merged(config, tmp_path, tmp_path / "out")
