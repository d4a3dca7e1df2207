"""Trackers through accelerate (`report_to`), offline: TensorBoard event files read back, a W&B offline run and a
local trackio project, each with the sample images, and the same tracker run continued on resume.

The runs are command-line runs in subprocesses: W&B and trackio read their settings (offline mode, where trackio
keeps its database) from the environment when they are first imported.
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from grpo_img.config import load_config
from grpo_img.reporting import read_metrics
from grpo_img.trainer import SetupError, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red image", "a green image", "a blue image"]  # the demo's prompts; 3 groups of 8 per step


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """Two steps (checkpoint at each), then a resume to four, logging to TensorBoard, W&B and trackio."""
    root = tmp_path_factory.mktemp("tracked")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio")}
    common = ["--output_dir", str(root / "run"), "--image_log_steps", "1", "--save_steps", "1",
              "--report_to", "[tensorboard, wandb, trackio]", "--eval_steps", "2", "--eval_prompts",
              '["a red image"]', "--eval_num_images", "2"]
    for extra in (["--max_steps", "2"], ["--max_steps", "4", "--resume"]):
        done = subprocess.run([sys.executable, "-m", "grpo_img.train", *common, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def strip_size(run: Path) -> tuple[int, int]:
    first = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    return Image.open(run / first["image"]).size


def test_tensorboard_has_the_scalars_at_their_steps_and_one_image_per_prompt(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked_run / "run"
    logdir = run / "tensorboard" / "grpo-img"
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    metrics = read_metrics(run)
    rewards = events.Scalars("reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3, 4]  # the resume continued the same event stream, no duplicates
    assert [e.value for e in rewards] == pytest.approx([m["reward_mean"] for m in metrics])
    assert sorted(events.Tags()["images"]) == sorted([f"samples/{p}" for p in PROMPTS] + ["eval/all"])
    grid = Image.open(run / "eval" / "step_000004" / "grids" / "all.png")
    assert [(e.step, e.width, e.height) for e in events.Images("eval/all")] == [(2, *grid.size), (4, *grid.size)]
    assert [e.step for e in events.Scalars("eval/color")] == [2, 4]
    width, height = strip_size(run)
    assert width == 128 * 8
    for tag in (f"samples/{p}" for p in PROMPTS):
        logged = events.Images(tag)
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert {(e.width, e.height) for e in logged} == {(width, height)}
    hparams = list(logdir.rglob("hparams.yml"))  # the run config as hyperparameters
    assert hparams and "num_generations: 8" in hparams[0].read_text()


def test_wandb_offline_run_holds_the_images_and_resume_continues_the_same_run(tracked_run):
    run = tracked_run / "run"
    run_id = torch.load(run / "checkpoint-4" / "trainer_state.pt", weights_only=False)["tracker_run_id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # first run and resume
    images = sorted(p for f in folders for p in (f / "files" / "media" / "images").rglob("*.png"))
    samples = [p for p in images if p.parent.name == "samples"]
    assert len(samples) == 4 * len(PROMPTS)  # every step's group strips
    assert {Image.open(p).size for p in samples} == {strip_size(run)}
    assert len([p for p in images if p.parent.name == "eval"]) == 2  # the grids of the evaluations at 2 and 4
    record = (folders[0] / f"run-{run_id}.wandb").read_bytes()  # the offline run's records: config and history
    assert b"num_generations" in record and b"reward_mean" in record


def test_trackio_local_project_holds_metrics_and_captioned_images(tracked_run):
    database = tracked_run / "trackio" / "grpo-img.db"
    rows = sqlite3.connect(database).execute("select run_name, step, metrics from metrics").fetchall()
    assert len({name for name, _, _ in rows}) == 1  # the resume continued the same run
    logged = [(step, json.loads(values)) for _, step, values in rows]
    assert sorted(step for step, values in logged if "reward_mean" in values) == [1, 2, 3, 4]
    images = [(step, value) for step, values in logged for key, value in values.items() if key.startswith("samples/")]
    assert len(images) == 4 * len(PROMPTS)
    assert sorted(step for step, values in logged if "eval/all" in values) == [2, 4]
    assert all(value["_type"] == "trackio.image" and "rewards" in value["caption"] for _, value in images)
    media = tracked_run / "trackio" / "media"
    assert all((media / value["file_path"]).is_file() for _, value in images)


def test_report_to_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker"):
        load_config(None, {"report_to": "tensorbord"})
    with pytest.raises(ValueError, match="is now report_to"):
        load_config(None, {"report_to_tensorboard": "false"})
    assert load_config(None, {"report_to": "none"}).report_to == "none"


def test_an_uninstalled_tracker_is_named_with_its_package_before_anything_is_built(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine without aim
                        lambda name, *a: None if name == "aim" else find_spec(name, *a))
    config = load_config(None, {"report_to": "[tensorboard, aim]", "output_dir": str(tmp_path / "run")})
    with pytest.raises(SetupError, match="pip install aim"):
        train(config)
    assert not (tmp_path / "run").exists()
