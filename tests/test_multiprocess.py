"""Two CPU processes (gloo) through `accelerate launch`: the trainer's gradients over two processes equal those of
one process holding both processes' samples, and the weights stay identical across processes while training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/multi_cpu.yaml"), "--main_process_port", "0",
               str(ROOT / "tests/multiproc_check.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    # the same fixed rollout batch in this (single) process, over the union of both processes' samples
    sys.path.insert(0, str(ROOT / "tests"))
    from accelerate import Accelerator
    from multiproc_check import LOSS_TYPES, fixed_batch

    single = fixed_batch(Accelerator())
    for loss_type in LOSS_TYPES:
        one = single[loss_type]
        for rank in ranks:
            two = rank["fixed"][loss_type]
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), loss_type
            assert one["grads"].keys() == two["grads"].keys()
            for name, grad in one["grads"].items():
                assert grad.abs().max() > 0 or "lora_A" in name, f"{loss_type}: no gradient for {name}"
                torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-7,
                                           msg=lambda m: f"{loss_type} {name}: {m}")

    # a few training steps: identical weights on both processes, and they did move
    first, second = ranks[0]["trained"], ranks[1]["trained"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    moved = [n for n in first if not torch.equal(first[n], ranks[0]["initial"][n])]
    assert any("lora" in n for n in moved) and len(moved) > 10


def test_sharding_set_ups_are_refused_with_the_reason():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from grpo_img.trainer import check_distributed_type

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(NotImplementedError, match="accelerator.prepare"):
            check_distributed_type(SimpleNamespace(distributed_type=kind))
    check_distributed_type(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


@pytest.mark.parametrize("name", ["ddp", "multi_node_ddp", "multi_cpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes >= 2
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
