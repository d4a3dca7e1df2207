"""Checkpoints: adapter (peft format), optimizer, scheduler, RNG states and step, written atomically.

A checkpoint is written to a temporary folder and renamed into place, so an interrupted save never leaves a
half-written `checkpoint-N` behind, and older checkpoints are deleted only after the new one is complete.

Under FSDP (grpo_img/sharding.py) the caller gathers the full adapter weights and the optimizer state first and
passes them in: the adapter is then the same plain peft adapter, and the optimizer state is in the name-keyed full
form of `torch.distributed.checkpoint` (`optimizer_layout: "by_name"`), which only a sharded run loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Config fields a resume may change: they do not change the training trajectory (logging, saving, evaluation,
# stopping rules, where the run lives). max_steps may only grow. Every other difference is refused.
RESUMABLE_CHANGES = {"max_steps", "logging_steps", "image_log_steps", "save_steps", "save_total_limit",
                     "report_to", "tracker_project_name", "eval_steps", "eval_prompts", "eval_rewards",
                     "eval_num_images", "output_dir", "overwrite_output_dir", "max_nonfinite_steps", "max_reward_failure_steps"}


def save_checkpoint(output_dir: str | Path, step: int, peft_model, optimizer, scheduler, extra: dict,
                    keep: int, adapter_state: dict | None = None, optimizer_state: dict | None = None,
                    config: dict | None = None) -> Path:
    """`adapter_state` / `optimizer_state`: gathered full states of a sharded run (None: taken from the objects);
    `config`: the run's config, kept as the checkpoint's config.json (read on resume without loading the rest)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "optimizer_layout": "by_index" if optimizer_state is None else "by_name",
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            **extra,
        },
        tmp / "trainer_state.pt",
    )
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    write_manifest(tmp)  # last: a checkpoint whose files do not match it is not used
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be used (a file missing, truncated or changed against its manifest), or None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (written before manifests, or cut short)"
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "manifest.json is not valid JSON"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if file_digest(path) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(output_dir: str | Path, resume: str | bool) -> Path:
    """`resume=True` (or "latest"): the newest checkpoint in output_dir; a string: that checkpoint folder."""
    if resume is True or resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-* in {output_dir}")
        for path in reversed(found):  # the newest one that verifies
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("--resume: skipping %s: %s; trying the one before", path, problem)
        raise ValueError(f"--resume: no checkpoint in {output_dir} verifies against its manifest")
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (no trainer_state.pt)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume: {path} cannot be used: {problem}")
    return path


def saved_config(checkpoint: Path) -> dict | None:
    """The config a checkpoint was written under, as JSON reads it (None: a checkpoint from before configs were
    kept in it)."""
    path = checkpoint / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resume_changes(saved: dict, config: dict, checkpoint_step: int) -> dict:
    """The fields that differ between the checkpoint's config and this one: refused (ValueError naming them) where
    they change the trajectory, returned ({field: (old, new)}) where a resume may change them."""
    differ = {k: (saved.get(k), v) for k, v in config.items() if k in saved and saved[k] != v}
    refused = {k: d for k, d in differ.items() if k not in RESUMABLE_CHANGES}
    if refused:
        lines = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(refused.items()))
        raise ValueError(f"--resume: the config differs from the checkpoint's in fields that change the training "
                         f"trajectory: {lines}. Resume with the checkpoint's values, or start a new run (another "
                         "output_dir, or --overwrite_output_dir true)")
    if config["max_steps"] <= checkpoint_step:
        raise ValueError(f"--resume: max_steps {config['max_steps']} is not above the checkpoint's step "
                         f"{checkpoint_step}: there is nothing left to train (raise max_steps)")
    return differ


def load_checkpoint(path: Path, peft_model, optimizer, scheduler) -> dict:
    """Adapter, optimizer, scheduler and RNG states of an unsharded run, in one call."""
    load_adapter(path, peft_model)
    return load_trainer_state(path, optimizer, scheduler)


def load_adapter(path: Path, peft_model) -> None:
    """The checkpoint's adapter weights into an unsharded model (under FSDP: before sharding it)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    set_peft_model_state_dict(peft_model, load_peft_weights(str(path / "adapter")))


def load_trainer_state(path: Path, optimizer, scheduler, load_optimizer=None) -> dict:
    """Optimizer, scheduler and RNG states; returns the saved dict (step, run state, ...). `load_optimizer`: how a
    sharded run loads a name-keyed optimizer state (grpo_img.sharding.load_full_optimizer_state); None: the
    unsharded `optimizer.load_state_dict`."""
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    layout = state.get("optimizer_layout", "by_index")
    if (layout == "by_name") != (load_optimizer is not None):
        written, running = ("an FSDP", "without FSDP") if layout == "by_name" else ("an unsharded", "under FSDP")
        raise ValueError(f"{path} was written by {written} run and cannot be resumed {running}: its optimizer "
                         "state is laid out differently; resume with the same kind of launch (or start a new run "
                         "from its adapter)")
    if load_optimizer is None:
        optimizer.load_state_dict(state["optimizer"])
    else:
        load_optimizer(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
