"""What a run leaves behind for people: metrics.jsonl, TensorBoard scalars, image grids and a reward curve."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


class MetricsLog:
    """One JSON object per step in `metrics.jsonl`, mirrored to TensorBoard (flat numbers only).

    On resume the file is cut back to the checkpoint's step, so a resumed run's log reads like an uninterrupted one.
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        for name in ("metrics.jsonl", "plans.jsonl"):
            restart_step_log(Path(output_dir) / name, resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_step_log(path: Path) -> list[tuple[str, dict]]:
    """The (line, record) pairs of a JSONL step log. A torn last line (the run died mid-write: power loss, a full
    disk) is dropped with a warning; an unreadable line before the last one is corruption and an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON (and it is not the last line, so this is not a "
                                 "write cut short): the log is corrupted") from None
            log.warning("%s: dropping its torn last line (%d characters), written when the run stopped mid-write",
                        path, len(line))
    return records


def read_metrics(output_dir: str | Path) -> list[dict]:
    return [record for _, record in read_step_log(Path(output_dir) / "metrics.jsonl")]


def image_grid(images: list[Image.Image], captions: list[str], columns: int, cell: int = 128) -> Image.Image:
    """Images in rows of `columns` (one group per row), each scaled to `cell` px with a caption under it."""
    rows = math.ceil(len(images) / columns)
    caption_height = 14
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_height)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), caption[: cell // 6], fill="black")
    return grid


def plot_reward_curve(metrics: list[dict], path: str | Path) -> None:
    """reward_mean (with a +-std band) and each prompt's mean reward against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    mean = [m["reward_mean"] for m in metrics]
    std = [m["reward_std"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, color="black", label="reward_mean")
    ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                    color="grey", alpha=0.2, label="± reward_std")
    prompts = sorted({p for m in metrics for p in m.get("reward_per_prompt", {})})
    if len(prompts) <= 8:
        for prompt in prompts:
            points = [(m["step"], m["reward_per_prompt"][prompt]) for m in metrics
                      if prompt in m.get("reward_per_prompt", {})]
            ax.plot(*zip(*points), ".", alpha=0.5, label=prompt[:40])
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def restart_step_log(path: Path, resume_step: int | None) -> None:
    """A JSONL log with a "step" per line, as a run starts: emptied for a fresh run, cut after the checkpoint's
    step on resume (the steps after it will be run and logged again)."""
    if not path.exists():
        return
    if resume_step is None:
        path.unlink()
        return
    kept = [line for line, record in read_step_log(path) if record["step"] <= resume_step]
    path.write_text("".join(line + "\n" for line in kept))
