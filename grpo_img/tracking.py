"""Experiment trackers through accelerate's tracking (`Accelerator(log_with=...)`): scalars, the run config as
hyperparameters, and sample images, to TensorBoard (default), W&B, trackio, MLflow, Comet or Aim.

`report_to` takes TRL/transformers' names and values: a name, a list of names, "all" (every installed one) or
"none". Images go to every tracker that takes them: TensorBoard's image panel (one tag per prompt, with its step
slider), W&B and trackio images with captions, and accelerate's `log_images` where a tracker has one.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: report_to name -> (accelerate's log_with name, the module it imports, the pip package that brings it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
    "trackio": ("trackio", "trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet_ml", "comet-ml"),
    "aim": ("aim", "aim", "aim"),
}
REPORT_TO_VALUES = (*TRACKERS, "all", "none")


def report_to_names(report_to: str | list[str] | None) -> list[str]:
    """The trackers `report_to` names, checked: unknown names are an error (installation is checked by
    `check_installed`, at start-up)."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = ["none" if n is None else str(n) for n in names]
    unknown = [n for n in names if n not in REPORT_TO_VALUES]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(REPORT_TO_VALUES)}")
    if "all" in names:
        return [n for n, (_, module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None]
    return [n for n in dict.fromkeys(names) if n != "none"]


def check_installed(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][1]) is None]
    if missing:
        packages = " ".join(TRACKERS[n][2] for n in missing)
        raise ValueError(f"report_to names {', '.join(missing)}, which is not installed: pip install {packages} "
                         "(or drop it from report_to)")


def new_run_id() -> str:
    """The id a tracker run keeps across resumes (W&B's run id; trackio's run name)."""
    return uuid.uuid4().hex[:12]


def tracker_init_kwargs(names: list[str], output_dir: Path, run_id: str, resume_step: int | None) -> dict:
    """Per-tracker start options: TensorBoard drops events after the checkpoint's step on resume; W&B and trackio
    continue the run with the same id."""
    kwargs: dict[str, dict] = {}
    if "tensorboard" in names:
        kwargs["tensorboard"] = {"purge_step": (resume_step or 0) + 1}
    if "wandb" in names:
        kwargs["wandb"] = {"id": run_id, "resume": "allow", "name": output_dir.name, "dir": str(output_dir)}
    if "trackio" in names:
        kwargs["trackio"] = {"name": f"{output_dir.name}-{run_id}", "resume": "allow"}
    return kwargs


def hyperparameters(config: dict) -> dict:
    """The run config as flat hyperparameters (numbers, strings and booleans; nested values as their text), the
    form every tracker takes."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            flat[key] = "None" if value is None else value
        else:
            flat[key] = str(value)
    return flat


def scalars(metrics: dict) -> dict:
    """The finite numbers of a metrics record, the step left out (it is the tracker's step)."""
    return {k: v for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_images(accelerator, images: dict[str, tuple[Image.Image, str]], step: int) -> None:
    """Log {tag: (image, caption)} to every tracker of `accelerator` that takes images."""
    for tracker in accelerator.trackers:
        name = tracker.name
        if name == "tensorboard":
            for tag, (image, _) in images.items():
                tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            tracker.writer.flush()
        elif name == "wandb":
            import wandb

            tracker.run.log({tag: wandb.Image(image, caption=caption) for tag, (image, caption) in images.items()},
                            step=step)
        elif name == "trackio":
            import trackio

            tracker.run.log({tag: trackio.Image(image, caption=caption) for tag, (image, caption) in images.items()},
                            step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [np.asarray(image.convert("RGB"))] for tag, (image, _) in images.items()},
                               step=step)


def image_tag(prefix: str, text: str, limit: int = 60) -> str:
    """A tracker tag for a prompt: its start, with characters trackers treat as separators replaced."""
    cleaned = "".join(c if c.isalnum() or c in " -_,." else "_" for c in text[:limit]).strip()
    return f"{prefix}/{cleaned or 'prompt'}"
