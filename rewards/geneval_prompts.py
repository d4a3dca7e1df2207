"""GenEval-style prompts: a seeded generator for the six tasks, and JSONL read/write in GenEval's metadata format.

Release facts (djghosh13/geneval `prompts/create_prompts.py`): the 80 COCO classes (`rewards.geneval.COCO_CLASSES`),
10 colours, 4 relations; "a"/"an" by leading vowel; plural adds "es" after a final "s", else "s". Templates and
metadata per task:
- single_object `a photo of a X` (each class at most once): include [{X, 1}]
- two_object `a photo of a A and a B` (A != B): include [{A, 1}, {B, 1}]
- counting `a photo of {two,three,four} Xs`: include [{X, N}], exclude [{X, N+1}]
- colors `a photo of a C X` (X != person): include [{X, 1, color C}]
- position `a photo of a A REL a B`: include [{B, 1}, {A, 1, position [REL, 0]}]
- color_attr `a photo of a C1 A and a C2 B` (distinct non-person classes, distinct colours): two colour includes
GenEval's released file has 553 prompts: 80 / 99 / 80 / 94 / 100 / 100 per task (100 drawn per task with seed 43,
duplicates dropped). Our generator draws per task (numpy `default_rng(seed)`, the same draws per sample as GenEval)
until it has the asked number of distinct prompts, so the default reproduces GenEval's split, not its exact prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rewards.geneval import COCO_CLASSES, COLORS, POSITIONS, TAGS, validate_metadata

GENEVAL_COUNTS: dict[str, int] = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                  "position": 100, "color_attr": 100}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    return f"{word}es" if word.endswith("s") else f"{word}s"


def _non_person(rng: np.random.Generator, size: int | None = None):
    """Classes other than "person", drawn as GenEval does (offset from person's index)."""
    n = len(COCO_CLASSES)
    idx = rng.choice(n - 1, size=size, replace=False) + 1 if size else rng.choice(n - 1) + 1
    return (idx + COCO_CLASSES.index("person")) % n


def _two_object(rng):
    a, b = (COCO_CLASSES[i] for i in rng.choice(len(COCO_CLASSES), size=2, replace=False))
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}


def _counting(rng, max_count: int = 4):
    x = COCO_CLASSES[rng.choice(len(COCO_CLASSES))]
    n = int(rng.integers(2, max_count, endpoint=True))
    return {"tag": "counting", "include": [{"class": x, "count": n}], "exclude": [{"class": x, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(x)}"}


def _colors(rng):
    x = COCO_CLASSES[_non_person(rng)]
    c = COLORS[rng.choice(len(COLORS))]
    return {"tag": "colors", "include": [{"class": x, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(c)} {x}"}


def _position(rng):
    a, b = (COCO_CLASSES[i] for i in rng.choice(len(COCO_CLASSES), size=2, replace=False))
    rel = POSITIONS[rng.choice(len(POSITIONS))]
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}


def _color_attr(rng):
    a, b = (COCO_CLASSES[i] for i in _non_person(rng, size=2))
    ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"}


_SAMPLERS = {"two_object": _two_object, "counting": _counting, "colors": _colors, "position": _position,
             "color_attr": _color_attr}
_CAPACITY = {"single_object": 80, "two_object": 80 * 79, "counting": 80 * 3, "colors": 79 * 10,
             "position": 80 * 79 * 4, "color_attr": 79 * 78 * 10 * 9}


def generate_geneval_prompts(seed: int = 0, counts: dict | None = None) -> list[dict]:
    """Distinct GenEval-style prompt records, task by task in GenEval's order; `counts` maps tag -> number
    (default GenEval's 553 split; tags left out get 0)."""
    counts = dict(GENEVAL_COUNTS if counts is None else counts)
    unknown = sorted(set(counts) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown GenEval task(s) {unknown}; tasks: {TAGS}")
    for tag, n in counts.items():
        if not isinstance(n, int) or n < 0 or n > _CAPACITY[tag]:
            raise ValueError(f"count for {tag!r} must be an integer in [0, {_CAPACITY[tag]}] (distinct prompts "
                             f"that exist); got {n!r}")
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    for tag in TAGS:
        n = counts.get(tag, 0)
        if tag == "single_object":
            picked = rng.choice(len(COCO_CLASSES), size=n, replace=False) if n else []
            records += [{"tag": tag, "include": [{"class": COCO_CLASSES[i], "count": 1}],
                         "prompt": f"a photo of {with_article(COCO_CLASSES[i])}"} for i in picked]
            continue
        seen: set[str] = set()
        while len(seen) < n:
            record = _SAMPLERS[tag](rng)
            key = json.dumps(record, sort_keys=True)
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


def write_geneval_metadata(records: list[dict], path: str | Path) -> None:
    """One JSON object per line (`tag`, `include`, optional `exclude`, `prompt`), GenEval's
    `evaluation_metadata.jsonl` format; also a prompt file for `grpo_img.data.load_prompts`."""
    for i, record in enumerate(records):
        _check(record, f"records[{i}]")
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def load_geneval_metadata(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        _check(record, f"{path}:{n}")
        records.append(record)
    if not records:
        raise ValueError(f"no records in {path}")
    return records


def _check(record, where: str) -> None:
    try:
        validate_metadata(record)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f"{where}: no 'prompt' text")
    if record["tag"] not in TAGS:
        raise ValueError(f"{where}: unknown tag {record['tag']!r}; tasks: {TAGS}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write GenEval-style prompt metadata (JSONL) for training.")
    parser.add_argument("output", help="path of the .jsonl file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-task", type=int, default=None,
                        help="prompts per task (single_object at most 80); default: GenEval's 553-prompt split")
    args = parser.parse_args()
    counts = None
    if args.per_task is not None:
        counts = {t: min(args.per_task, _CAPACITY[t]) for t in TAGS}
    out = generate_geneval_prompts(args.seed, counts)
    write_geneval_metadata(out, args.output)
    print(f"wrote {len(out)} prompts to {args.output}")
