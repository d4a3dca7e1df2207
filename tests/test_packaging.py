"""grpo-img installs like a package: the wheel holds every module and the shipped configs, and installed from it,
in an empty directory and with the checkout out of reach, the demo runs (`accelerate launch -m grpo_img.train` and
the `grpo-img` entry point) and `--config NAME` finds a shipped config by name."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--max_steps", "2", "--report_to", "none", "--image_log_steps", "0", "--save_steps", "0"]


@pytest.mark.slow
def test_the_wheel_runs_the_demo_from_an_empty_directory(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("grpo_img-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("grpo_img/configs/demo_tiny.yaml", "grpo_img/configs/accelerate/fsdp.yaml", "grpo_img/train.py",
                     "policies/base.py", "policies/modules/vqgan.py", "policies/checkpoints/seed_x.py",
                     "rewards/palette.py"):
        assert expected in names, f"{expected} is not in the wheel"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy comes before the checkout's editable one

    where = subprocess.run([sys.executable, "-c", "import grpo_img.config, policies; print(grpo_img.config.__file__,"
                            " policies.__file__, grpo_img.config.shipped_configs_dir())"],
                           cwd=empty, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where

    accelerate = Path(sys.executable).parent / "accelerate"
    demo = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "-m", "grpo_img.train",
                           "--output_dir", str(empty / "demo"), *RUN], cwd=empty, env=env, capture_output=True,
                          text=True)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (empty / "demo" / "adapter" / "adapter_config.json").is_file()
    assert len((empty / "demo" / "metrics.jsonl").read_text().splitlines()) == 2

    by_name = subprocess.run([str(site / "bin" / "grpo-img"), "--config", "emu3_tiny_demo", "--output_dir",
                              str(empty / "emu3"), *RUN], cwd=empty, env=env, capture_output=True, text=True)
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert json.loads((empty / "emu3" / "config.json").read_text())["policy"] == "emu3"
