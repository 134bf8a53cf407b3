"""One checkpointer for a run: named ``Stateful`` parts in, one checkpoint out, and back.

A part is anything with ``state_dict()`` / ``load_state_dict()``, the ``Stateful`` protocol of
``torch.distributed.checkpoint`` (``torch.distributed.checkpoint.stateful``): the train state, the
mixer, the sampler, the metric window, the RNGs. The trainer hands them over by name and never
sees how they are written; the checkpointer owns the one difference between the parallelisms:
under ddp the model and optimizer state go into the ``.pt`` whole, under fsdp each rank writes
its shards with DCP and the ``.pt`` names them (docs/design.md section 2.5).

``shared`` parts are the same on every rank (saved from rank 0); ``per_rank`` parts differ by rank
(data position, RNG, metric window) and are saved as ``"ranks": [{name: state} per rank]``. The
file format and its safety (atomic writes, ``weights_only`` loading, the fallback to the newest
readable checkpoint) are :mod:`dograph.train.checkpoint`'s.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from dograph.distributed import DistContext, all_gather_objects, from_main
from dograph.errors import ConfigError
from dograph.parallel import full_model_state_dict, load_sharded_state, save_sharded_state
from dograph.train.checkpoint import fresh_shards_dir, load_latest, read_complete, save_checkpoint, set_aside_newer

log = logging.getLogger(__name__)


class RNGState:
    """Every random generator a step may touch (Python, NumPy, torch CPU and CUDA), as one ``Stateful``."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _require_stateful(parts: Mapping[str, Any]) -> None:
    """A one-line ``TypeError`` for a part that cannot be checkpointed (checked when used: benchmarks never save)."""
    for name, part in parts.items():
        if not isinstance(part, Stateful):
            raise TypeError(f"checkpoint part {name!r} ({type(part).__name__}) is not Stateful: it needs "
                            "state_dict() and load_state_dict()")


class Checkpointer:
    """Saves and restores a run's named parts in ``<run_dir>/checkpoints`` (``step_<N>.pt``, ``latest``).

    A shared part that also writes files of its own (a mixer's histories, ``save_artifacts``) writes
    them under ``<run_dir>/<name>/`` after each save, on rank 0.
    """

    def __init__(self, run_dir: Path, dist: DistContext, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sharded: bool, shared: Mapping[str, Any], per_rank: Mapping[str, Any], keep: int = 2) -> None:
        self.run_dir, self.dist, self.model, self.optimizer = run_dir, dist, model, optimizer
        self.sharded, self.shared, self.per_rank, self.keep = sharded, dict(shared), dict(per_rank), keep
        self._chosen: dict[str, dict[str, Any]] = {}  # the checkpoint rank 0 chose to resume from, as read

    @property
    def directory(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def parallelism(self) -> str:
        """What this run actually does (one process under ``fsdp`` shards nothing: ``ddp``)."""
        return "fsdp" if self.sharded else "ddp"

    def full_model_state(self) -> dict[str, Any] | None:
        """The unsharded model state on rank 0 under fsdp (a collective: every rank calls it); None otherwise."""
        return full_model_state_dict(self.model) if self.sharded else None

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int) -> Path | None:
        """Write step ``step``'s checkpoint (a collective); its path on rank 0, None on the others."""
        _require_stateful({**self.shared, **self.per_rank})
        ranks = all_gather_objects(self.dist, {name: part.state_dict() for name, part in self.per_rank.items()})
        weights = self._save_weights(step)  # (a collective under fsdp)
        if not self.dist.is_main:
            return None
        state = {**{name: part.state_dict() for name, part in self.shared.items()}, **weights,
                 "ranks": ranks, "parallelism": self.parallelism}
        path = save_checkpoint(self.directory, step, state, keep=self.keep)
        for name, part in self.shared.items():
            if hasattr(part, "save_artifacts"):
                part.save_artifacts(self.run_dir / name)
        return path

    def _save_weights(self, step: int) -> dict[str, Any]:
        """ddp: the model and optimizer state whole; fsdp: each rank's shards first (a collective), then their name."""
        if not self.sharded:
            return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        # rank 0 names a directory no checkpoint uses yet: a second save at this step keeps the live one
        shards = from_main(self.dist, lambda: fresh_shards_dir(self.directory, step))
        save_sharded_state(self.model, self.optimizer, shards, self.dist)
        return {"shards": shards.name}

    # ---- restoring ---------------------------------------------------------------------------
    def restore(self) -> Path | None:
        """Load every part from the checkpoint rank 0 chooses (every rank the same one); None when there is none."""
        _require_stateful({**self.shared, **self.per_rank})
        name = from_main(self.dist, self._choose)
        if name is None:
            return None
        path = self.directory / name
        state = self._chosen.pop(name) if name in self._chosen else read_complete(path)  # rank 0 has read it
        self._check(path, state)
        if self.sharded:  # read_complete checked that its shards are complete
            load_sharded_state(self.model, self.optimizer, path.parent / state["shards"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        for part_name, part in self.shared.items():
            part.load_state_dict(state[part_name])
        mine = state["ranks"][self.dist.rank]
        for part_name, part in self.per_rank.items():
            part.load_state_dict(mine.get(part_name, {}))  # (a part saved since: empty in an older checkpoint)
        log.info("resumed from %s", path)
        return path

    def _check(self, path: Path, state: dict[str, Any]) -> None:
        """The same number of ranks and the same parallelism as the run that wrote it (our choice)."""
        if len(state["ranks"]) != self.dist.world_size:
            raise ConfigError(f"checkpoint {path} was written by {len(state['ranks'])} ranks; resume it with "
                              f"the same number (this run has {self.dist.world_size})")
        written = state.get("parallelism", "ddp")
        if written != self.parallelism:
            raise ConfigError(f"checkpoint {path} was written with trainer.parallelism={written}; resume it with "
                              f"the same (its optimizer state is keyed differently)")

    def _choose(self) -> str | None:
        """Rank 0: the checkpoint to resume from (the newest readable one if ``latest`` names a damaged one).

        After such a fallback the newer, abandoned checkpoints are set aside before anything is written.
        """
        found = load_latest(self.directory)
        if found is None:
            return None
        path, self._chosen = found[0], {found[0].name: found[1]}
        if moved := set_aside_newer(self.directory, path):
            log.warning("set aside the checkpoints after %s as *.abandoned: %s", path.name, ", ".join(moved))
        return path.name
