"""Atomic, safe-to-load checkpoints: write a temp file, fsync, rename; the previous one stays until then.

A checkpoint is one ``torch.save`` dict of every stateful part of a run (model, optimizer,
step, mixer, data position of every rank, RNG states of every rank), gathered by name by
:class:`dograph.train.checkpointer.Checkpointer`; this module is the file format. ``latest``
names the newest complete one. A crash while writing leaves only a ``.tmp`` file, never a torn
checkpoint, and nothing ``latest`` names (directly, or the shards its ``.pt`` names) is
removed before its replacement is complete.

Checkpoints are read with ``torch.load(weights_only=True)``: a shared checkpoint cannot run
code when it is loaded. So what is saved holds only tensors and plain Python values; numpy
values (RNG states, packer buffers, mixer arrays) are encoded as tagged plain dicts on the
way in and decoded on the way out (:func:`to_plain`, :func:`from_plain`), in one place rather
than in every mixer.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dograph.atomic import replace_atomically, write_text_atomically
from dograph.errors import DataError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")
SHARDS_SUFFIX = ".shards"  # step_<step>[.<k>].shards/: an fsdp checkpoint's model and optimizer shards (DCP)
_SHARDS = re.compile(r"^step_(\d{8})(?:\.\d+)?\.shards$")
DCP_METADATA = ".metadata"  # written by DCP once every rank's shards are in: a complete shards directory has it
_NUMPY = "__numpy__"  # tag of an encoded numpy value: {"__numpy__": "array"|"scalar", "dtype": str, "data": ...}
_SCALARS = (type(None), bool, int, float, str, bytes, bytearray, complex)  # exactly these types (no subclasses)
_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)
_DICTS = (dict, OrderedDict)  # a model's state_dict is an OrderedDict


class UnsafeCheckpoint(DataError):
    """A checkpoint holds objects that unpickling would construct by running code: refused, never loaded."""


# ---- a plain-types codec (weights_only=True loads only tensors and plain Python values) ----------


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with every numpy array and scalar replaced by a tagged plain dict (tensors stay tensors).

    Containers are rebuilt only where something inside changed, so a model's ``state_dict`` (an
    ``OrderedDict`` with ``_metadata``) is saved as it is. Anything else that is not plain raises
    ``TypeError`` naming where it is: a checkpoint that could not be loaded must not be written.
    """
    if isinstance(value, np.ndarray | np.generic):  # before the plain types: np.float64 is a float
        return _encode_numpy(value, where)
    if _is_plain(value):
        return value
    if isinstance(value, dict):
        items = {key: to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        for key in items:
            if not _is_plain(key) and type(key) is not tuple:
                raise TypeError(f"cannot checkpoint {where}: key {key!r} is a {type(key).__name__}")
        if type(value) in _DICTS and all(items[key] is value[key] for key in value):
            return value
        return type(value)(items) if type(value) in _DICTS else dict(items)
    if type(value) in (list, tuple, set):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    raise TypeError(f"cannot checkpoint {where}: a {type(value).__module__}.{type(value).__qualname__} is neither "
                    "a tensor nor a plain Python or numpy value (store it as one in the state_dict)")


def _is_plain(value: Any) -> bool:
    """What ``torch.load(weights_only=True)`` rebuilds by itself (an ``IntEnum`` is an int but is not)."""
    return type(value) in _SCALARS or isinstance(value, _TORCH)


def _encode_numpy(value: np.ndarray | np.generic, where: str) -> dict[str, Any]:
    dtype = value.dtype
    if isinstance(value, np.generic):
        data = value.item()
        if not _is_plain(data):
            raise TypeError(f"cannot checkpoint {where}: a numpy {dtype} scalar")
        return {_NUMPY: "scalar", "dtype": dtype.str, "data": data}
    if dtype.kind in "biufc":  # numbers: a tensor of the same bytes (native byte order)
        array = np.asarray(value, dtype=dtype.newbyteorder("="), order="C")  # (ascontiguousarray makes 0-d 1-d)
        return {_NUMPY: "array", "dtype": dtype.str, "data": torch.from_numpy(array if array.flags.writeable
                                                                               else array.copy())}
    if dtype.kind in "US":  # text: a nested list
        return {_NUMPY: "array", "dtype": dtype.str, "data": value.tolist()}
    raise TypeError(f"cannot checkpoint {where}: a numpy array of dtype {dtype}")


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain` (containers rebuilt only where something inside was decoded)."""
    if isinstance(value, dict):
        if _NUMPY in value:
            return _decode_numpy(value)
        items = {key: from_plain(item) for key, item in value.items()}
        if all(items[key] is value[key] for key in value):
            return value
        return type(value)(items) if type(value) in _DICTS else dict(items)
    if type(value) in (list, tuple, set):
        items = [from_plain(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    return value


def _decode_numpy(value: dict[str, Any]) -> np.ndarray | np.generic:
    dtype = np.dtype(value["dtype"])
    if value[_NUMPY] == "scalar":
        return dtype.type(value["data"])
    data = value["data"]
    if isinstance(data, torch.Tensor):
        return data.numpy().astype(dtype, copy=False)
    return np.array(data, dtype=dtype)


# ---- writing ------------------------------------------------------------------------------------




def fresh_shards_dir(directory: Path, step: int) -> Path:
    """Where to write step ``step``'s shards: ``step_<step>.shards``, or ``step_<step>.<k>.shards`` if taken.

    A second save at a step (a finished run resumed, a save repeated) must not delete the shards
    the current ``step_<step>.pt`` names before the new ``.pt`` names the new ones.
    """
    candidate, k = directory / f"step_{step:08d}{SHARDS_SUFFIX}", 0
    while candidate.exists():
        k += 1
        candidate = directory / f"step_{step:08d}.{k}{SHARDS_SUFFIX}"
    return candidate


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``step_<step>.pt`` atomically, point ``latest`` at it, keep ``keep`` newest.

    An fsdp ``state`` names its shards directory (``state["shards"]``, written before this call).
    Only after ``latest`` names the new file are old checkpoints and shards removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    plain = to_plain(state)
    replace_atomically(path, lambda tmp: torch.save(plain, tmp), durable=True)
    write_text_atomically(directory / "latest", path.name, durable=True)
    _prune(directory, step, keep, state.get("shards"))
    return path


def _prune(directory: Path, step: int, keep: int, shards: str | None) -> None:
    """Remove all but the ``keep`` newest checkpoints up to ``step``, and every shards directory none names.

    Checkpoints after ``step`` belong to a stretch of training this run abandoned (it resumed from
    an older one because they could not be read, :func:`load_latest`) and go too.
    """
    steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    kept = set([s for s in steps if s <= step][-keep:])
    for p in directory.iterdir():
        if (m := _NAME.match(p.name)) and int(m.group(1)) not in kept:
            p.unlink()
    for p in directory.iterdir():  # after the .pt files: a shards directory goes only once no .pt names it
        if (m := _SHARDS.match(p.name)) and p.is_dir():
            owner = int(m.group(1))
            if owner not in kept or (owner == step and p.name != shards):
                shutil.rmtree(p)


# ---- reading ------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state, loaded without running any code its pickle might hold (``weights_only=True``).

    :class:`UnsafeCheckpoint` (one line, naming what it holds) for a pickle that asks for anything
    but tensors and plain values; ``DataError`` for a missing, truncated or corrupt file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpoint(
                f"refusing to load checkpoint {path}: it holds {', '.join(unsafe)}, which a dograph checkpoint "
                "never holds and unpickling could run as code (load only checkpoints you made or trust; one "
                "written before checkpoints held plain types only must be retrained)") from None
        # not torch's advice to load it with weights_only=False: what the unpickler tripped on
        found = re.search(r"WeightsUnpickler error: (.*?)\s*(?:Check the documentation|$)", _one_line(exc))
        reason = found.group(1) if found else _one_line(exc)
        raise DataError(f"cannot read checkpoint {path} (damaged: {reason})") from exc
    except Exception as exc:  # a missing, corrupt or truncated file
        raise DataError(f"cannot read checkpoint {path} ({type(exc).__name__}: {_one_line(exc)})") from exc
    if not isinstance(state, dict):
        raise DataError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a dict")
    return from_plain(state)


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle names that ``weights_only`` does not allow (read without executing anything)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # unreadable: the caller reports it as damaged
        return []


def read_complete(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, and for an fsdp checkpoint a check that the shards it names are all there."""
    state = load_checkpoint(path)
    if "shards" in state:
        shards = path.parent / state["shards"]
        if not (shards / DCP_METADATA).is_file():
            raise DataError(f"{path} names its shards {shards.name}, which are missing or incomplete")
    return state


def checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """The ``step_<step>.pt`` files of ``directory`` as (step, path), oldest first."""
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``latest`` names and its state; None when there is no ``latest``.

    When that one cannot be read (truncated on a full disk, its shards gone), the newest checkpoint
    that can be is used instead, with a one-line warning naming both; ``DataError`` when none can.
    A checkpoint refused as unsafe is never skipped over: it stops the resume.
    """
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    named = directory / pointer.read_text().strip()
    try:
        return named, read_complete(named)
    except UnsafeCheckpoint:
        raise
    except DataError as exc:
        problem = exc
    for _, path in reversed(checkpoint_files(directory)):
        if path.name == named.name:
            continue
        try:
            state = read_complete(path)
        except UnsafeCheckpoint:
            raise
        except DataError:
            continue
        log.warning("the checkpoint `latest` names, %s, cannot be used (%s): resuming from %s, the newest "
                    "readable checkpoint", named.name, problem, path.name)
        return path, state
    raise DataError(f"{problem}; no other checkpoint in {directory} can be read either")


ABANDONED_SUFFIX = ".abandoned"


def set_aside_newer(directory: Path, resumed: Path) -> list[str]:
    """After resuming from an older checkpoint than ``latest`` named: point ``latest`` at it and rename
    every newer checkpoint (and shards) to ``*.abandoned``, so no later prune or reader takes the abandoned
    stretch for the run's history. Returns the names set aside.
    """
    step = int(_NAME.match(resumed.name).group(1))
    write_text_atomically(directory / "latest", resumed.name, durable=True)
    moved = []
    for p in sorted(directory.iterdir()):
        m = _NAME.match(p.name) or _SHARDS.match(p.name)
        if m and int(m.group(1)) > step:
            p.rename(p.with_name(p.name + ABANDONED_SUFFIX))
            moved.append(p.name)
    return moved


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's whole model state in this one process (no process group), e.g. to rebuild the model.

    A ddp checkpoint holds it (``"model"``); an fsdp one names its DCP shards directory
    (``"shards"``), whose ``model.*`` entries are read back whole with ``dcp.load(no_dist=True)``.
    """
    state = read_complete(path)
    if "model" in state:
        return state["model"]
    if "shards" not in state:
        raise DataError(f"checkpoint {path} holds no model weights (neither 'model' nor 'shards')")
    return _gather_shards(path.parent / state["shards"])


def _gather_shards(shards: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(shards))
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not model:
        raise DataError(f"{shards} holds no model shards")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": meant so (no_dist)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
