"""Evaluate any policy (with or without a LoRA adapter) on a prompt set: GenEval, an OCR benchmark, or any
registered reward as a metric.

    python -m grpo_img.evaluate --policy janus --policy-options '{"model_name_or_path": "deepseek-community/Janus-Pro-7B"}' \
        [--adapter runs/j7b/adapter] --benchmark geneval|ocr|reward:NAME --out DIR

The core is generic: a list of prompt records, a per-image scorer returning a dict of metrics, and a grouping key
(the task). `evaluate` samples `num_images` images per prompt, scores them, appends one line per prompt to
`DIR/results.jsonl` (so an interrupted evaluation resumes where it stopped: finished prompts are not redone),
saves the images, and writes `report.json`, `report.md` and an image grid per task in `DIR/grids/`.

Release facts relied on (GenEval, Ghosh et al. 2023, djghosh13/geneval): 553 prompts in six tasks (single_object,
two_object, counting, colors, position, color_attr), 4 images per prompt; an image is correct or not (strict
rules); a task's score is the mean over its images; the overall score is the unweighted mean of the six task
scores. Deliberate deviation: the prompt set is our GenEval-style generator (`rewards.geneval_prompts`, same
templates and split, seeded), not the released file; pass the released `evaluation_metadata.jsonl` with
`--prompts` to use it. Seeds: the images of prompt chunk c are sampled with seed `seed * 1_000_003 + c`, so a
resumed evaluation draws the same images as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

import policies
import rewards
from grpo_img.checkpoint import file_digest
from grpo_img.data import PromptRecord, load_prompts
from grpo_img.reporting import image_grid
from rewards.base import score_with_isolation
from rewards.geneval import GenEvalReward
from rewards.geneval_prompts import generate_geneval_prompts
from rewards.ocr import OCRReward

log = logging.getLogger("grpo_img.evaluate")

# scorer(images, records) -> one dict of metrics per image (numbers are averaged; strings are kept as details)
Scorer = Callable[[list[Image.Image], list[PromptRecord]], list[dict]]


def task_of(record: PromptRecord) -> str:
    """The grouping key: GenEval's `tag`, else a `task` field, else one group "all"."""
    return str(record.metadata.get("tag") or record.metadata.get("task") or "all")


@dataclass
class Benchmark:
    name: str
    records: list[PromptRecord]
    scorer: Scorer
    headline: str  # the per-image metric the overall score is built from
    overall_over: str = "tasks"  # "tasks": unweighted mean of the task means (GenEval); "images": mean over images
    task_of: Callable[[PromptRecord], str] = task_of


@dataclass
class Sampling:
    """Sampling overrides; a value left at None is the policy family's release setting (`default_sampling`)."""

    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# The generic core


def evaluate(policy, benchmark: Benchmark, out_dir: str | Path | None = None, num_images: int = 4,
             prompts_per_batch: int = 4, sampling: Sampling | None = None, seed: int = 0, progress: bool = True,
             grid_rows: int = 8, identity: dict | None = None) -> dict:
    """Sample, score and report. Returns the report (also written to `out_dir`, when given).

    With `out_dir`, results already in `out_dir/results.jsonl` are kept and their prompts are not sampled again,
    but only when they come from the same evaluation: `out_dir/run.json` records the policy (with `identity`, e.g.
    its options and the adapter's content hash), the benchmark and its prompts, the sampling settings, the images
    per prompt and the seed; a different one is refused, naming what differs.
    """
    sampling = sampling or Sampling()
    settings = policy.sampling_settings(**asdict(sampling))  # the family's defaults where nothing was given
    log.info("sampling with %s (%s)", settings, "family defaults" if sampling == Sampling() else "given")
    records = benchmark.records
    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict] = {}
    if out is not None:
        run = {"policy": policy.name, **(identity or {}), "benchmark": benchmark.name,
               "prompts_sha256": hashlib.sha256(json.dumps([[r.prompt, r.metadata] for r in records],
                                                           sort_keys=True, default=str).encode()).hexdigest(),
               "sampling": asdict(settings), "num_images": num_images, "seed": seed}
        check_same_evaluation(out, run)
        (out / "images").mkdir(parents=True, exist_ok=True)
        done = _read_results(out / "results.jsonl", records)
        if done:
            log.info("resuming: %d of %d prompts already evaluated in %s", len(done), len(records), out)
    bar = tqdm(total=len(records), initial=len(done), desc=f"eval {benchmark.name}", unit="prompt",
               disable=not progress)
    was_training = policy.model.training
    policy.model.eval()
    for chunk_start in range(0, len(records), prompts_per_batch):
        pending = [i for i in range(chunk_start, min(chunk_start + prompts_per_batch, len(records)))
                   if i not in done]
        if not pending:
            continue
        chunk = [records[i] for i in pending]
        generator = torch.Generator(policy.device).manual_seed(seed * 1_000_003 + chunk_start // prompts_per_batch)
        with torch.no_grad():
            rollout = policy.sample([r.prompt for r in chunk], num_images, cfg_scale=settings.cfg_scale,
                                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                    min_p=settings.min_p, generator=generator)
            images = policy.decode(rollout)
        per_image_records = [r for r in chunk for _ in range(num_images)]
        scores = benchmark.scorer(images, per_image_records)
        if len(scores) != len(images):
            raise ValueError(f"scorer of {benchmark.name!r} returned {len(scores)} results for {len(images)} images")
        lines = []
        for k, index in enumerate(pending):
            record = records[index]
            result = {"index": index, "prompt": record.prompt, "task": benchmark.task_of(record),
                      "metadata": record.metadata, "images": [], "metrics": scores[k * num_images:(k + 1) * num_images]}
            if out is not None:
                for j, image in enumerate(images[k * num_images:(k + 1) * num_images]):
                    name = f"images/{index:05d}_{j}.png"
                    image.save(out / name)
                    result["images"].append(name)
            done[index] = result
            lines.append(json.dumps(result) + "\n")
        if out is not None:  # one write per chunk, after its images: a line present means the prompt is finished
            with (out / "results.jsonl").open("a") as f:
                f.write("".join(lines))
        bar.update(len(pending))
        bar.set_postfix({benchmark.headline: f"{running_mean(done.values(), benchmark.headline):.3f}"})
    bar.close()
    policy.model.train(was_training)

    report = summarize([done[i] for i in sorted(done)], benchmark, num_images)
    report["sampling"] = {**asdict(settings), "given": {k: v for k, v in asdict(sampling).items() if v is not None}}
    if out is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(markdown_report(report))
        write_task_grids(out, [done[i] for i in sorted(done)], benchmark.headline, num_images, grid_rows)
    return report


def running_mean(results, metric: str) -> float:
    """The mean of `metric` over the images scored so far (the progress bar's running score)."""
    values = [m[metric] for r in results for m in r["metrics"]
              if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    return sum(values) / len(values) if values else math.nan


def check_same_evaluation(out: Path, run: dict) -> None:
    """Results in `out` may be resumed only by the evaluation that wrote them (its run.json); a first run writes
    run.json. A folder with results but no run.json (an older evaluation) cannot be vouched for: refused."""
    path = out / "run.json"
    run = json.loads(json.dumps(run, default=str))  # as it reads back
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if differ:
            lines = "; ".join(f"{k}: {saved.get(k)!r} -> {run.get(k)!r}" for k in differ)
            raise ValueError(f"{out} holds the results of another evaluation ({lines}); resuming would report its "
                             "scores as this one's. Use another --out, or delete the folder")
        return
    if (out / "results.jsonl").is_file():
        raise ValueError(f"{out} holds results without a run.json saying which evaluation wrote them; use another "
                         "--out, or delete the folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=2))


def adapter_digest(adapter: str | None) -> str | None:
    """sha256 over a LoRA adapter folder's files (names and contents): which adapter an evaluation scored."""
    if adapter is None:
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(adapter).rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(adapter)}:{file_digest(file)}".encode())
    return digest.hexdigest()


def _read_results(path: Path, records: list[PromptRecord]) -> dict[int, dict]:
    if not path.exists():
        return {}
    done = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a write cut short by the interruption: that prompt is redone
                log.warning("%s: ignoring an incomplete last line", path)
                continue
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        index = result.get("index")
        if not isinstance(index, int) or index >= len(records) or records[index].prompt != result.get("prompt"):
            raise ValueError(f"{path}:{n}: result for prompt {result.get('prompt')!r} at index {index} does not "
                             "belong to this prompt set; use another --out directory or delete the file")
        done[index] = result
    # rewrite without a cut-short line, so that appending continues cleanly
    path.write_text("".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    return done


def summarize(results: list[dict], benchmark: Benchmark, num_images: int) -> dict:
    """Per task, the mean of every numeric metric over its images; the overall score from the task means."""
    tasks: dict[str, dict[str, list[float]]] = {}
    for result in results:
        values = tasks.setdefault(result["task"], {})
        for metrics in result["metrics"]:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):  # NaN: an image that could not be scored
                    values.setdefault(key, []).append(float(value))
    task_means = {task: {key: sum(v) / len(v) for key, v in sorted(metrics.items())}
                  for task, metrics in sorted(tasks.items())}
    all_images: dict[str, list[float]] = {}
    for metrics in tasks.values():
        for key, v in metrics.items():
            all_images.setdefault(key, []).extend(v)
    image_means = {key: sum(v) / len(v) for key, v in sorted(all_images.items())}
    if benchmark.overall_over == "tasks":
        headline = [m[benchmark.headline] for m in task_means.values() if benchmark.headline in m]
        overall = sum(headline) / len(headline) if headline else math.nan
    else:
        overall = image_means.get(benchmark.headline, math.nan)
    return {
        "benchmark": benchmark.name,
        "headline": benchmark.headline,
        "overall": overall,
        "prompts": len(results),
        "prompts_total": len(benchmark.records),
        "images_per_prompt": num_images,
        "tasks": task_means,
        "task_prompts": {task: sum(r["task"] == task for r in results) for task in task_means},
        "overall_over": benchmark.overall_over,
        "image_means": image_means,
    }


def _sampling_line(sampling: dict | None) -> str:
    if not sampling:
        return ""
    values = ", ".join(f"{k} {sampling[k]}" for k in ("cfg_scale", "temperature", "top_k", "top_p", "min_p")
                       if k in sampling)
    given = sampling.get("given") or {}
    source = "all the family's defaults" if not given else f"given: {', '.join(sorted(given))}; the rest the family's"
    cfg = "no CFG" if sampling["cfg_scale"] == 1.0 else f"CFG {sampling['cfg_scale']}"
    return f"Sampling: {cfg} ({values}; {source})."


def markdown_report(report: dict) -> str:
    metrics = sorted({key for task in report["tasks"].values() for key in task})
    over = "mean of the task scores" if report["overall_over"] == "tasks" else "mean over images"
    means = ", ".join(f"{k} {v:.4f}" for k, v in report["image_means"].items())
    lines = [f"# {report['benchmark']}", "", f"Overall ({report['headline']}, {over}): **{report['overall']:.4f}**",
             "", f"Means over all images: {means}.", "",
             f"{report['prompts']} of {report['prompts_total']} prompts, {report['images_per_prompt']} images each.",
             "", _sampling_line(report.get("sampling")),
             "", "| task | prompts | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for task, means in report["tasks"].items():
        cells = [f"{means[m]:.4f}" if m in means else "" for m in metrics]
        lines.append(f"| {task} | {report['task_prompts'][task]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_task_grids(out: Path, results: list[dict], headline: str, num_images: int, rows: int) -> None:
    """grids/TASK.png: the first `rows` prompts of each task, one row each, the headline metric under each image."""
    (out / "grids").mkdir(exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for result in results:
        by_task.setdefault(result["task"], []).append(result)
    for task, task_results in by_task.items():
        images, captions = [], []
        for result in task_results[:rows]:
            for j, (name, metrics) in enumerate(zip(result["images"], result["metrics"])):
                images.append(Image.open(out / name))
                value = metrics.get(headline)
                caption = f"{float(value):.2f}" if isinstance(value, (int, float)) else "?"
                captions.append(f"{result['prompt'][:14]} {caption}" if j == 0 else caption)
        if images:
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
            image_grid(images, captions, columns=num_images).save(out / "grids" / f"{safe}.png")


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks: thin layers over the core


def reward_benchmark(specs: list[dict] | str, records: list[PromptRecord]) -> Benchmark:
    """Any registered reward(s) as metrics: `specs` is a reward name or a list of {name, **options}. Each image
    gets one metric per reward (named after it); the headline is the first."""
    if isinstance(specs, str):
        specs = [{"name": specs}]
    built = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        spec.pop("weight", None)
        built.append((name, rewards.build(name, **spec)))

    def scorer(images, records):
        prompts, metadata = [r.prompt for r in records], [r.metadata for r in records]
        columns = {name: score_with_isolation(reward, images, prompts, metadata)[0].tolist()
                   for name, reward in built}
        return [{name: values[i] for name, values in columns.items()} for i in range(len(images))]

    return Benchmark(name="reward:" + "+".join(n for n, _ in built), records=records, scorer=scorer,
                     headline=built[0][0])


GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_benchmark(records: list[PromptRecord] | None = None, evaluator=None, **reward_options) -> Benchmark:
    """GenEval's strict protocol. `evaluator`: anything with `evaluate(images, metadata) -> [GenEvalResult]`
    (default: `rewards.geneval.GenEvalReward(**reward_options)`). Per image: `correct` (0/1, the strict rule),
    `score` (the dense score) and the `reason`. Overall = unweighted mean of the task means of `correct`."""
    if records is None:
        records = [PromptRecord(m["prompt"], {k: v for k, v in m.items() if k != "prompt"})
                   for m in generate_geneval_prompts(seed=0)]
    if evaluator is None:
        evaluator = GenEvalReward(**reward_options)
    for n, record in enumerate(records):
        if record.metadata.get("tag") not in GENEVAL_TASKS:
            raise ValueError(f"GenEval prompt {n} ({record.prompt!r}) has tag {record.metadata.get('tag')!r}; "
                             f"expected one of {GENEVAL_TASKS}")

    def scorer(images, records):
        results = evaluator.evaluate(images, [r.metadata for r in records])
        return [{"correct": float(r.correct), "score": float(r.score), "reason": r.reason} for r in results]

    return Benchmark(name="geneval", records=records, scorer=scorer, headline="correct")


# Text-rendering prompts: templates x words, seeded. The target is the quoted text (rewards.ocr's rule).
OCR_TEMPLATES = ('a sign that says "{w}"', 'a poster with the text "{w}"', 'a storefront with a sign reading "{w}"',
                 'a t-shirt printed with "{w}"', 'a book cover titled "{w}"', 'a neon sign that says "{w}"',
                 'a chalkboard with "{w}" written on it', 'a coffee mug with the word "{w}"')
OCR_WORDS = ("OPEN", "SALE", "hello", "Welcome", "GRPO", "coffee", "EXIT", "STOP", "Bakery", "Good Morning",
             "No Parking", "Happy Birthday", "Library", "Fresh Bread", "2026", "Thank You", "Hotel", "Garden",
             "Music Night", "Dream Big")


def ocr_prompts(count: int = 100, seed: int = 0) -> list[PromptRecord]:
    """`count` distinct text-rendering prompts (at most templates x words), with `text` and `task` metadata."""
    pairs = [(t, w) for t in OCR_TEMPLATES for w in OCR_WORDS]
    if not 0 < count <= len(pairs):
        raise ValueError(f"count must be in [1, {len(pairs)}], got {count}")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:count]
    return [PromptRecord(pairs[i][0].format(w=pairs[i][1]),
                         {"text": pairs[i][1], "task": "multi_word" if " " in pairs[i][1] else "one_word"})
            for i in order.tolist()]


def ocr_benchmark(records: list[PromptRecord] | None = None, reward=None, **reward_options) -> Benchmark:
    """Text rendering: per image the OCR reward (`ocr`), exact match (`exact`, 0/1) and the text read. `reward`:
    anything with `read(images, prompts, metadata) -> [OCRResult]` (default `rewards.ocr.OCRReward`)."""
    records = records if records is not None else ocr_prompts()
    if reward is None:
        reward = OCRReward(**reward_options)

    def scorer(images, records):
        results = reward.read(images, [r.prompt for r in records], [r.metadata for r in records])
        return [{"ocr": float(r.score), "exact": float(r.exact), "text": r.text, "target": r.target}
                for r in results]

    # the mean OCR reward and the exact-match rate over all images (`image_means`); tasks are a one/multi-word split
    return Benchmark(name="ocr", records=records, scorer=scorer, headline="ocr", overall_over="images")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def load_policy(name: str, options: dict, adapter: str | None = None, device: str | None = None):
    """A policy by registry name, with a LoRA adapter (a `save_pretrained` folder, e.g. runs/x/adapter) on top."""
    policy = policies.build(name, **options)
    if adapter is not None:
        attach_adapter(policy, adapter)
    if device is not None:
        policy.to(device)
    policy.model.eval()
    return policy


def attach_adapter(policy, adapter: str | Path):
    """A saved LoRA adapter (a `save_pretrained` folder) on the policy's model; returns the PeftModel. peft injects
    it into the model's modules in place, so the policy's code uses it unchanged."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter at {adapter} (adapter_config.json missing)")
    return PeftModel.from_pretrained(policy.model, str(adapter))


def build_benchmark(spec: str, prompts: str | None, reward_options: dict, limit: int | None) -> Benchmark:
    records = None
    if prompts is not None:
        records = load_prompts(prompts)
    if spec == "geneval":
        benchmark = geneval_benchmark(records, **reward_options)
    elif spec == "ocr":
        benchmark = ocr_benchmark(records, **reward_options)
    elif spec.startswith("reward:"):
        if records is None:
            raise ValueError("--benchmark reward:NAME needs --prompts (a .txt or .jsonl file)")
        benchmark = reward_benchmark([{"name": spec[len("reward:"):], **reward_options}], records)
    else:
        raise ValueError(f"unknown benchmark {spec!r}: use geneval, ocr or reward:NAME")
    if limit is not None:  # per task, so that a quick GenEval run still covers the six tasks
        kept: dict[str, int] = {}
        records = []
        for record in benchmark.records:
            task = benchmark.task_of(record)
            if kept.get(task, 0) < limit:
                kept[task] = kept.get(task, 0) + 1
                records.append(record)
        benchmark.records = records
    return benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", required=True, help="policy family (registry name)")
    parser.add_argument("--policy-options", default="{}", help="JSON passed to policies.build")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder to evaluate on top of the policy")
    parser.add_argument("--benchmark", required=True, help="geneval | ocr | reward:NAME")
    parser.add_argument("--reward-options", default="{}", help="JSON options of the benchmark's reward model")
    parser.add_argument("--prompts", default=None, help="prompt file (.jsonl with metadata, or .txt) instead of "
                        "the benchmark's own set; required for reward:NAME")
    parser.add_argument("--out", required=True, help="output folder (resumes what is already there)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--batch-prompts", type=int, default=4, help="prompts sampled together")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of each task")
    family = "default: the policy family's release setting"
    parser.add_argument("--cfg-scale", type=float, default=None, help=family)
    parser.add_argument("--temperature", type=float, default=None, help=family)
    parser.add_argument("--top-k", type=int, default=None, help=family)
    parser.add_argument("--top-p", type=float, default=None, help=family)
    parser.add_argument("--min-p", type=float, default=None, help=family)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        policy_options, reward_options = json.loads(args.policy_options), json.loads(args.reward_options)
    except json.JSONDecodeError as error:
        sys.exit(f"--policy-options / --reward-options must be JSON: {error}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    benchmark = build_benchmark(args.benchmark, args.prompts, reward_options, args.limit)
    policy = load_policy(args.policy, policy_options, args.adapter, device)
    identity = {"policy_options": policy_options, "adapter_sha256": adapter_digest(args.adapter)}
    report = evaluate(policy, benchmark, args.out, num_images=args.num_images, prompts_per_batch=args.batch_prompts,
                      sampling=Sampling(args.cfg_scale, args.temperature, args.top_k, args.top_p, args.min_p),
                      seed=args.seed, identity=identity)
    print(markdown_report(report))
    return report


if __name__ == "__main__":
    main()
