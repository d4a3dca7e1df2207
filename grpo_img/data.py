"""Prompts: from a list, a text file (one per line), a JSONL file (`prompt` plus metadata that rewards read) or a
`datasets` dataset; and a deterministic, resumable order over them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PromptRecord:
    prompt: str
    metadata: dict


def load_prompts(source, prompt_column: str = "prompt") -> list[PromptRecord]:
    """Load prompts. `source`: a list (of strings or dicts), a .txt, .jsonl, .json or .yaml path, or
    "hf:NAME[:SPLIT]"."""
    if isinstance(source, (list, tuple)):
        records = [_record(item, prompt_column, f"prompts[{i}]") for i, item in enumerate(source)]
    elif isinstance(source, str) and source.startswith("hf:"):
        records = _from_dataset(source[3:], prompt_column)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                    records.append(_record(item, prompt_column, f"{path}:{n}"))
        elif path.suffix in (".json", ".yaml", ".yml"):  # one list of strings or objects
            items = _read_list_file(path)
            records = [_record(item, prompt_column, f"{path}[{i}]") for i, item in enumerate(items)]
        elif path.suffix in (".txt", ""):
            records = [PromptRecord(line.strip(), {}) for line in path.read_text().splitlines() if line.strip()]
        else:
            raise ValueError(f"prompt file {path}: unknown format {path.suffix!r}; use .txt (one prompt per line), "
                             ".jsonl (one object per line), or .json / .yaml (one list)")
    else:
        raise ValueError(f"cannot read prompts from {source!r}")
    if not records:
        raise ValueError(f"no prompts found in {source!r}")
    return records


def _read_list_file(path: Path) -> list:
    import yaml

    try:
        items = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of prompts (strings or objects), got {type(items).__name__}")
    return items


def _record(item, prompt_column: str, where: str) -> PromptRecord:
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where}: empty prompt")
        return PromptRecord(item, {})
    if isinstance(item, dict):
        if not isinstance(item.get(prompt_column), str) or not item[prompt_column].strip():
            raise ValueError(f"{where}: no {prompt_column!r} text in {item}")
        return PromptRecord(item[prompt_column], {k: v for k, v in item.items() if k != prompt_column})
    raise ValueError(f"{where}: expected a string or an object, got {type(item).__name__}")


def _from_dataset(spec: str, prompt_column: str) -> list[PromptRecord]:
    from datasets import load_dataset, load_from_disk

    name, _, split = spec.partition(":")
    split = split or "train"
    dataset = load_from_disk(name) if Path(name).is_dir() else load_dataset(name, split=split)
    if hasattr(dataset, "keys") and split in dataset:  # a DatasetDict saved to disk
        dataset = dataset[split]
    if prompt_column not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no column {prompt_column!r}; columns: {dataset.column_names}")
    return [_record(row, prompt_column, f"{name}[{i}]") for i, row in enumerate(dataset)]


class PromptSchedule:
    """Which prompts each process gets at each step: a seeded shuffle per epoch, no state to save.

    Each process takes its own whole prompts, so every group of G samples lives on one process and its
    advantages are computed there (see docs/distributed.md).
    """

    def __init__(self, records: list[PromptRecord], prompts_per_step: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.records = records
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def at_step(self, step: int) -> list[PromptRecord]:
        per_step = self.prompts_per_step * self.world_size
        start = step * per_step + self.rank * self.prompts_per_step
        picked = []
        for position in range(start, start + self.prompts_per_step):
            epoch, offset = divmod(position, len(self.records))
            order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.seed + epoch))
            picked.append(self.records[int(order[offset])])
        return picked

    def extra_at_step(self, step: int, round_index: int) -> list[PromptRecord]:
        """Further prompts for dynamic sampling (round 1, 2, ... of a step): drawn with a generator seeded by step,
        round and process, so a resumed run draws the same ones as an uninterrupted run."""
        seed = ((self.seed * 1_000_003 + step) * 1009 + round_index) * self.world_size + self.rank
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(self.records), (self.prompts_per_step,), generator=generator)
        return [self.records[int(i)] for i in picks]
