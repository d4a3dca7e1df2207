"""A run's report as a static page: `python -m grpo_img.report RUN_DIR` -> RUN_DIR/report/index.html.

The page needs no server and fetches nothing: its figures are matplotlib PNGs and its sample images are copied
next to it, so the `report/` folder opens from disk and can be zipped and shared. It shows the reward curves (mean
with a band, each reward part, each prompt), the training diagnostics (KL, entropy, clip ratio, grad norm, loss,
step time), each prompt's samples over training side by side (rewards and plans under them), and the evaluations'
tables and grids where the run evaluated.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import shutil
from pathlib import Path

from grpo_img.reporting import read_metrics, read_step_log

log = logging.getLogger(__name__)

DIAGNOSTICS = ("kl", "entropy", "clip_ratio", "grad_norm", "loss", "step_seconds")
PER_PROMPT_LINES = 12  # more prompts than this: their curves are one grey band of lines, no legend


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html (replacing an earlier report); returns its path."""
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} is not a grpo-img run folder (no metrics.jsonl)")
    metrics = read_metrics(run)
    if not metrics:
        raise ValueError(f"{run}/metrics.jsonl has no steps yet: nothing to report")
    out = run / "report"
    shutil.rmtree(out, ignore_errors=True)
    (out / "figures").mkdir(parents=True)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    samples = [record for _, record in read_step_log(run / "samples.jsonl")] \
        if (run / "samples.jsonl").is_file() else []
    evaluations = read_evaluations(run)

    figures = [("Rewards", plot_rewards(metrics, out / "figures" / "rewards.png"))]
    if any(m.get("reward_per_prompt") for m in metrics):
        figures.append(("Reward per prompt", plot_per_prompt(metrics, out / "figures" / "per_prompt.png")))
    figures.append(("Training", plot_diagnostics(metrics, out / "figures" / "training.png")))
    if any(k.startswith("eval/") for m in metrics for k in m):
        figures.append(("Evaluation", plot_evaluation(metrics, out / "figures" / "evaluation.png")))

    body = [header(run, config, metrics)]
    body.append("<h2>Curves</h2>")
    body += [f'<figure><img src="figures/{path.name}" alt="{html.escape(title)}"><figcaption>{html.escape(title)}'
             "</figcaption></figure>" for title, path in figures if path is not None]
    body.append(samples_section(run, out, samples))
    body.append(evaluation_section(run, out, evaluations))
    body.append(config_section(config))
    page = PAGE.format(title=html.escape(f"grpo-img run {run.resolve().name}"), body="\n".join(body))
    (out / "index.html").write_text(page)
    return out / "index.html"


def read_evaluations(run: Path) -> list[tuple[int, dict, Path]]:
    """(step, report, folder) of each evaluation the run wrote (eval/step_N/report.json), by step."""
    found = []
    for folder in sorted((run / "eval").glob("step_*")) if (run / "eval").is_dir() else []:
        if (folder / "report.json").is_file():
            found.append((int(folder.name.split("_")[1]), json.loads((folder / "report.json").read_text()), folder))
    return found


# -- figures ------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, axes, path: Path) -> Path:
    """Whole steps on the x axes, then the figure as a PNG (closed: a long report must not hold every figure)."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clear()
    _pyplot().close(fig)
    return path


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in metrics
              if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_rewards(metrics: list[dict], path: Path) -> Path:
    """reward_mean with a +-reward_std band, and each reward part (reward/NAME) of a weighted sum."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    steps, mean = _series(metrics, "reward_mean")
    std = [next(m.get("reward_std", 0.0) for m in metrics if m["step"] == s) for s in steps]
    ax.plot(steps, mean, color="black", label="reward_mean")
    ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color="grey",
                    alpha=0.2, label="± reward_std")
    parts = sorted({k for m in metrics for k in m if k.startswith("reward/")})
    for key in parts:
        ax.plot(*_series(metrics, key), label=key, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, [ax], path)


def plot_per_prompt(metrics: list[dict], path: Path) -> Path:
    """Each prompt's group mean reward at the steps it was sampled."""
    plt = _pyplot()
    prompts = sorted({p for m in metrics for p in m.get("reward_per_prompt", {})})
    fig, ax = plt.subplots(figsize=(8, 4))
    for prompt in prompts:
        points = [(m["step"], m["reward_per_prompt"][prompt]) for m in metrics
                  if isinstance(m.get("reward_per_prompt", {}).get(prompt), (int, float))
                  and math.isfinite(m["reward_per_prompt"][prompt])]
        if not points:
            continue
        if len(prompts) <= PER_PROMPT_LINES:
            ax.plot(*zip(*points), ".-", alpha=0.7, label=prompt[:50])
        else:
            ax.plot(*zip(*points), "-", color="tab:blue", alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("group mean reward")
    ax.set_title(f"{len(prompts)} prompts")
    ax.grid(alpha=0.3)
    if len(prompts) <= PER_PROMPT_LINES:
        ax.legend(fontsize=7)
    return _save(fig, [ax], path)


def plot_diagnostics(metrics: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, key in zip(axes.flat, DIAGNOSTICS):
        steps, values = _series(metrics, key)
        ax.plot(steps, values, color="tab:blue")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return _save(fig, axes.flat, path)


def plot_evaluation(metrics: list[dict], path: Path) -> Path:
    plt = _pyplot()
    keys = sorted({k for m in metrics for k in m if k.startswith("eval/")})
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in keys:
        ax.plot(*_series(metrics, key), "o-", label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, [ax], path)


# -- sections -----------------------------------------------------------------------------------------------------


def header(run: Path, config: dict, metrics: list[dict]) -> str:
    last = metrics[-1]
    window = metrics[-10:]
    rewards = ", ".join(f"{r.get('name')} (weight {r.get('weight', 1.0)})" for r in config.get("rewards") or [])
    rows = [("policy", config.get("policy", "?")), ("policy options", json.dumps(config.get("policy_options", {}))),
            ("rewards", rewards or "?"), ("steps", f"{last['step']} of {config.get('max_steps', '?')}"),
            ("reward_mean, first step", f"{metrics[0].get('reward_mean', math.nan):.4f}"),
            ("reward_mean, last 10 steps",
             f"{sum(m.get('reward_mean', math.nan) for m in window) / len(window):.4f}")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h1>{html.escape(run.resolve().name)}</h1><table class='facts'>{table}</table>"


def samples_section(run: Path, out: Path, samples: list[dict]) -> str:
    """Each prompt's sample strips at every logged step, in one row, oldest first."""
    if not samples:
        return "<h2>Samples</h2><p>No samples were logged (image_log_steps: 0).</p>"
    by_prompt: dict[str, list[dict]] = {}
    for record in samples:
        by_prompt.setdefault(record["prompt"], []).append(record)
    parts = ["<h2>Samples over training</h2>",
             "<p>Each row is one prompt; each cell one logged step's group of samples, reward under each image.</p>"]
    (out / "images").mkdir(exist_ok=True)
    for prompt, records in by_prompt.items():
        cells = []
        for record in sorted(records, key=lambda r: r["step"]):
            source = run / record["image"]
            if not source.is_file():
                continue
            name = f"images/{source.parent.name}_{source.name}"
            shutil.copyfile(source, out / name)
            shown = [("unscored" if r is None else f"{r:.3f}") for r in record["rewards"]]
            mean = [r for r in record["rewards"] if r is not None]
            caption = f"step {record['step']}: mean {sum(mean) / len(mean):.3f}" if mean else \
                f"step {record['step']}: unscored"
            plans = ""
            if record.get("plans"):
                plans = "<ol class='plans'>" + "".join(f"<li>{html.escape(p)}</li>" for p in record["plans"]) + "</ol>"
            cells.append(f"<td><img src='{name}' alt='{html.escape(prompt)} at step {record['step']}'>"
                         f"<div class='caption'>{html.escape(caption)}<br><span class='rewards'>"
                         f"{html.escape(' '.join(shown))}</span></div>{plans}</td>")
        parts.append(f"<h3>{html.escape(prompt)}</h3><div class='scroll'><table class='samples'><tr>"
                     f"{''.join(cells)}</tr></table></div>")
    return "\n".join(parts)


def evaluation_section(run: Path, out: Path, evaluations: list[tuple[int, dict, Path]]) -> str:
    if not evaluations:
        return ""
    parts = ["<h2>Evaluations</h2>"]
    keys = sorted({k for _, report, _ in evaluations for k in report.get("image_means", {})})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = "".join("<tr><td>" + str(step) + "</td>" + "".join(
        f"<td>{report['image_means'][k]:.4f}</td>" if isinstance(report.get("image_means", {}).get(k), (int, float))
        else "<td></td>" for k in keys) + "</tr>" for step, report, _ in evaluations)
    parts.append(f"<table class='eval'><tr><th>step</th>{head}</tr>{rows}</table>")
    step, _, folder = evaluations[-1]
    grids = sorted((folder / "grids").glob("*.png")) if (folder / "grids").is_dir() else []
    (out / "eval").mkdir(exist_ok=True)
    for grid in grids:
        name = f"eval/step_{step:06d}_{grid.name}"
        shutil.copyfile(grid, out / name)
        parts.append(f"<figure><img src='{name}' alt='evaluation grid {html.escape(grid.stem)}'><figcaption>"
                     f"last evaluation (step {step}): {html.escape(grid.stem)}</figcaption></figure>")
    return "\n".join(parts)


def config_section(config: dict) -> str:
    if not config:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                   for k, v in sorted(config.items()))
    return f"<details><summary>Run config</summary><table class='facts'>{rows}</table></details>"


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }}
table.facts th {{ text-align: left; padding-right: 1em; vertical-align: top; }}
table.facts td {{ font-family: monospace; }}
figure {{ margin: 1em 0; }}
figure img {{ max-width: 100%; border: 1px solid #ddd; }}
.scroll {{ overflow-x: auto; }}
table.samples td {{ vertical-align: top; padding: 0 0.6em 0.6em 0; }}
table.samples img {{ height: 120px; border: 1px solid #ddd; }}
.caption {{ font-size: 0.85em; }}
.rewards {{ font-family: monospace; color: #555; }}
ol.plans {{ font-size: 0.75em; color: #555; max-width: 30em; padding-left: 1.5em; }}
table.eval td, table.eval th {{ padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a run's report: RUN_DIR/report/index.html (static, opens "
                                     "from disk)")
    parser.add_argument("run_dir", help="the run's output_dir")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"report: {path}")


if __name__ == "__main__":
    main()
