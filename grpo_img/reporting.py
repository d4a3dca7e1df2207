"""What a run leaves behind for people: metrics.jsonl, the sample images of each prompt group (images/ and
samples.jsonl) and a reward curve. The trackers (grpo_img/tracking.py) get the same numbers and images, and
`python -m grpo_img.report` turns the folder into a page."""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from grpo_img.tracking import image_tag

log = logging.getLogger(__name__)
STEP_LOGS = ("metrics.jsonl", "samples.jsonl")


class MetricsLog:
    """One JSON object per step in `metrics.jsonl` (the trackers get the same numbers, grpo_img/tracking.py).

    On resume the step logs are cut back to the checkpoint's step, so a resumed run's log reads like an
    uninterrupted one.
    """

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        for name in STEP_LOGS:
            restart_step_log(Path(output_dir) / name, resume_step)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")


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


def group_strip(images: list[Image.Image], rewards: list[float], plans: list[str] | None = None,
                cell: int = 128) -> Image.Image:
    """One prompt group's samples side by side, each with its reward under it (and its plan, wrapped, with
    think-then-draw)."""
    line_height, chars = 12, cell // 6
    plan_lines = [textwrap.wrap(plan, chars)[:4] if plan else [] for plan in (plans or [""] * len(images))]
    caption_height = line_height * (1 + max((len(lines) for lines in plan_lines), default=0)) + 2
    strip = Image.new("RGB", (len(images) * cell, cell + caption_height), "white")
    draw = ImageDraw.Draw(strip)
    for i, (image, reward, lines) in enumerate(zip(images, rewards, plan_lines)):
        x = i * cell
        strip.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, 0))
        text = "unscored" if math.isnan(reward) else f"r {reward:.3f}"
        for k, line in enumerate([text, *lines]):
            draw.text((x + 2, cell + 1 + k * line_height), line, fill="black" if k == 0 else "dimgray")
    return strip


def save_samples(output_dir: Path, step: int, images: list[Image.Image], prompts: list[str], rewards: list[float],
                 plans: list[str] | None, group_size: int) -> dict[str, tuple[Image.Image, str]]:
    """Each prompt group's strip as images/step_N/group_K.png, indexed in samples.jsonl (step, prompt, rewards,
    plans, image); returns {tag: (strip, caption)} for the trackers."""
    folder = output_dir / "images" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    logged, lines = {}, []
    for k, start in enumerate(range(0, len(images), group_size)):
        rows = range(start, start + group_size)
        group_plans = [plans[i] for i in rows] if plans is not None else None
        group_rewards = [rewards[i] for i in rows]
        strip = group_strip([images[i] for i in rows], group_rewards, group_plans)
        name = f"images/step_{step:06d}/group_{k:02d}.png"
        strip.save(output_dir / name)
        shown = ", ".join("nan" if math.isnan(r) else f"{r:.3f}" for r in group_rewards)
        caption = f"{prompts[start]} | rewards {shown}"
        if group_plans is not None:
            caption += " | plans: " + " / ".join(group_plans)
        logged[image_tag("samples", prompts[start])] = (strip, caption)
        lines.append(json.dumps({"step": step, "group": k, "prompt": prompts[start],
                                 "rewards": [None if math.isnan(r) else r for r in group_rewards],
                                 "plans": group_plans, "image": name}) + "\n")
    with (output_dir / "samples.jsonl").open("a") as f:
        f.write("".join(lines))
    return logged


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
