"""Two CPU processes (gloo) through `accelerate launch`, data-parallel and FSDP: the trainer's gradients over two
processes equal those of one process holding both processes' samples, and the weights stay identical across
processes while training."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(tmp_path, config: str, *options: str, mode: tuple[str, ...] = (), timeout: int = 300) -> list[dict]:
    """tests/multiproc_check.py on 2 CPU processes (gloo) with configs/accelerate/CONFIG.yaml; each rank's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), *options, "--main_process_port", "0",
               str(ROOT / "tests/multiproc_check.py"), str(tmp_path), *mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    return ranks


@functools.cache
def one_process() -> dict:
    """The same fixed rollout batch in this (single) process, over the union of both processes' samples."""
    sys.path.insert(0, str(ROOT / "tests"))
    from accelerate import Accelerator
    from multiproc_check import fixed_batch

    return fixed_batch(Accelerator())


def assert_matches_one_process(ranks: list[dict]) -> None:
    from multiproc_check import LOSS_CASES

    single = one_process()
    for loss_type in LOSS_CASES:
        one = single[loss_type]
        for rank in ranks:
            two = rank["fixed"][loss_type]
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), loss_type
            assert one["grads"].keys() == two["grads"].keys()
            for name, grad in one["grads"].items():
                assert grad.abs().max() > 0 or "lora_A" in name, f"{loss_type}: no gradient for {name}"
                # float32 rounding scales with the gradient (luspo sums over tokens: larger gradients)
                atol = max(1e-7, 1e-5 * float(grad.abs().max()))
                torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=atol,
                                           msg=lambda m: f"{loss_type} {name}: {m}")

    # batch-scaled advantages: the two processes' halves are the one process's advantages
    torch.testing.assert_close(torch.cat([r["fixed"]["batch_advantages"] for r in ranks]),
                               single["batch_advantages"], rtol=1e-6, atol=1e-6)

    # a few training steps: identical weights on both processes, and they did move
    first, second = ranks[0]["trained"], ranks[1]["trained"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    moved = [n for n in first if not torch.equal(first[n], ranks[0]["initial"][n])]
    assert any("lora" in n for n in moved) and len(moved) > 10


@pytest.fixture(scope="module")
def data_parallel_ranks(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("ddp"), "multi_cpu")


@pytest.mark.slow
def test_two_processes_match_one_process(data_parallel_ranks):
    assert_matches_one_process(data_parallel_ranks)


@pytest.mark.slow
def test_collective_training_options_keep_processes_in_step(data_parallel_ranks, tmp_path_factory):
    """The data-parallel run trained with dynamic sampling, adaptive entropy, batch scaling and GDPO (see
    multiproc_check.COLLECTIVE_TRAINING): the weights stayed identical (above), and the options did act."""
    import json

    run = Path(data_parallel_ranks[0]["run_dir"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m["dynamic_sampling_rounds"] > 0 for m in metrics)
    assert all(m["entropy_coef"] > 0.01 for m in metrics)


@pytest.mark.slow
def test_a_reward_failing_on_one_process_stops_every_process(tmp_path):
    """The stop after max_reward_failure_steps unscored steps is collective: the process whose reward works stops
    too (with the same error) instead of waiting in the next collective forever."""
    ranks = launch(tmp_path, "multi_cpu", mode=("reward_failure",), timeout=240)
    for rank in ranks:
        assert "could not score any sample for 2 steps in a row (on process(es) [1] of 2)" in rank["outcome"]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path, data_parallel_ranks):
    """configs/accelerate/fsdp.yaml on 2 CPU processes: the decoder layers sharded (FSDP2 over gloo), the same
    loss and gradients (gathered to full) as one process on the union of samples, identical weights across
    processes, and the same trained weights as the data-parallel run (here with gradient checkpointing and the
    layers kept gathered while sampling); a resumed run ends where the uninterrupted one did; the saved adapter
    loads with plain peft."""
    ranks = launch(tmp_path, "fsdp", "--num_processes", "2", "--mixed_precision", "no")
    sharded = ranks[0]["sharded"]
    assert any("lora_A" in n for n in sharded) and any("base_layer" in n for n in sharded)
    assert all(".language_model.layers." in n for n in sharded), "only the decoder layers are sharded"
    assert all(rank["fixed"]["gathered_sampling_equal"] for rank in ranks)
    assert_matches_one_process(ranks)

    from grpo_img.reporting import read_metrics

    assert any(key.startswith("eval/") for key in read_metrics(tmp_path / "run")[-1]), "no evaluation logged"

    trained = ranks[0]["trained"]
    assert trained.keys() == data_parallel_ranks[0]["trained"].keys()
    for name, weight in data_parallel_ranks[0]["trained"].items():
        torch.testing.assert_close(trained[name], weight, msg=lambda m: f"FSDP vs DDP {name}: {m}")
    for name, weight in ranks[0]["resumed"].items():
        torch.testing.assert_close(weight, trained[name], msg=lambda m: f"resumed {name}: {m}")

    from peft import PeftModel

    from policies.tiny import tiny_janus

    adapter = tmp_path / "run" / "adapter"
    loaded = dict(PeftModel.from_pretrained(tiny_janus()[0], str(adapter)).base_model.model.named_parameters())
    saved = [n for n in trained if "lora_" in n or "modules_to_save" in n]
    assert any("lora_B" in n for n in saved) and any("generation_head" in n for n in saved)
    for name in saved:
        assert torch.equal(loaded[name], trained[name]), f"adapter file: {name}"


def test_deepspeed_is_refused_with_the_reason():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from grpo_img.trainer import check_distributed_type

    with pytest.raises(NotImplementedError, match="DeepSpeed needs the model and optimizer"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))


def test_fsdp_settings_from_the_accelerate_plugin(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from grpo_img.sharding import FSDPSettings
    from grpo_img.trainer import check_distributed_type

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)

    def accelerator(kind, **plugin):
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # a plugin writes it; restored after the test
        fsdp = FullyShardedDataParallelPlugin(**plugin) if plugin else None
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=fsdp))

    assert check_distributed_type(accelerator(DistributedType.MULTI_GPU)) is None
    assert check_distributed_type(accelerator(DistributedType.FSDP, fsdp_version=2)) == FSDPSettings()
    settings = check_distributed_type(accelerator(DistributedType.FSDP, fsdp_version=2, reshard_after_forward=False,
                                                  auto_wrap_policy="transformer_based_wrap",
                                                  transformer_cls_names_to_wrap=["LlamaDecoderLayer"]))
    assert settings == FSDPSettings(reshard_after_forward=False, layer_classes=("LlamaDecoderLayer",))
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        check_distributed_type(accelerator(DistributedType.FSDP, fsdp_version=1))
    refused = {"offload_params": "cpu_offload", "cpu_ram_efficient_loading": "cpu_ram_efficient_loading",
               "activation_checkpointing": "activation_checkpointing"}  # config option: plugin field
    for option, field in refused.items():
        with pytest.raises(NotImplementedError, match=f"fsdp_{option}"):
            check_distributed_type(accelerator(DistributedType.FSDP, fsdp_version=2, **{field: True}))


def test_every_family_names_its_decoder_layers(tiny_policy):
    """What FSDP shards: the language model's blocks, all of them, and nothing else (no vision or VQ blocks)."""
    layers = tiny_policy.decoder_layers()
    assert len(layers) == tiny_policy.model.config.get_text_config().num_hidden_layers
    assert len({type(layer) for layer in layers}) == 1


@pytest.mark.parametrize("name", ["ddp", "multi_node_ddp", "multi_cpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes >= 2
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
