"""Atomic checkpoints: write a temp file, fsync, rename; the previous one stays until then.

A checkpoint is one ``torch.save`` dict of every stateful part of a run (model, optimizer,
step, mixer, data position of every rank, RNG states of every rank); ``latest`` names the
newest complete one. A crash while writing leaves only a ``.tmp`` file, never a torn
checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dograph.errors import DataError

_NAME = re.compile(r"^step_(\d{8})\.pt$")
SHARDS_SUFFIX = ".shards"  # step_<step>.shards/: an fsdp checkpoint's model and optimizer shards (DCP)


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically, point ``latest`` at it, keep ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    _fsync_write(path, lambda handle: torch.save(state, handle))
    _fsync_write(directory / "latest", lambda handle: handle.write(path.name.encode()))
    for old in sorted(p for p in directory.iterdir() if _NAME.match(p.name))[:-keep]:
        old.unlink()
        shards = old.with_suffix(SHARDS_SUFFIX)  # the sharded model/optimizer state of an fsdp checkpoint
        if shards.is_dir():
            shutil.rmtree(shards)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not path.exists():
        raise DataError(f"{pointer} names {path.name}, which is missing: the checkpoint directory is damaged")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt or truncated file
        raise DataError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc})") from exc


def rng_state() -> dict[str, Any]:
    """Every random generator a step may touch (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
