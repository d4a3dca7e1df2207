"""Checkpoints: adapter (peft format), optimizer, scheduler, RNG states and step, written atomically.

A checkpoint is written to a temporary folder and renamed into place, so an interrupted save never leaves a
half-written `checkpoint-N` behind, and older checkpoints are deleted only after the new one is complete.

Under FSDP (grpo_img/sharding.py) the caller gathers the full adapter weights and the optimizer state first and
passes them in: the adapter is then the same plain peft adapter, and the optimizer state is in the name-keyed full
form of `torch.distributed.checkpoint` (`optimizer_layout: "by_name"`), which only a sharded run loads.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(output_dir: str | Path, step: int, peft_model, optimizer, scheduler, extra: dict,
                    keep: int, adapter_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """`adapter_state` / `optimizer_state`: gathered full states of a sharded run (None: taken from the objects)."""
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
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(output_dir: str | Path, resume: str | bool) -> Path:
    """`resume=True` (or "latest"): the newest checkpoint in output_dir; a string: that checkpoint folder."""
    if resume is True or resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-* in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (no trainer_state.pt)")
    return path


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
