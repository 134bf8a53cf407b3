"""Histories of mixers, saved as files for plots (docs/design.md sections 2.6, 3).

``MixerHistory`` (DoGraph):

``weights.csv``: one row per weighted step (cluster weights, batch cluster sizes, objective
value, fallback flag); ``assignments.npz``: per step the cluster of every sample of the
global batch and its human domain; ``refreshes.jsonl``: per K-means refresh the centroid
drift, the cluster-vs-domain contingency table, ARI and NMI.

``DomainWeightHistory`` (baselines): ``weights.csv``, one row per step of the weights over
human domains.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dograph.atomic import open_atomically


@dataclass
class MixerHistory:
    steps: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    fallbacks: list[bool] = field(default_factory=list)
    assignments: list[np.ndarray] = field(default_factory=list)
    domains: list[np.ndarray] = field(default_factory=list)
    refreshes: list[dict[str, Any]] = field(default_factory=list)

    def record_step(self, step: int, weights: np.ndarray, sizes: np.ndarray, value: float, fallback: bool,
                    assignment: np.ndarray, domain: np.ndarray) -> None:
        self.steps.append(step)
        self.weights.append([float(w) for w in weights])
        self.sizes.append([int(n) for n in sizes])
        self.values.append(float(value))
        self.fallbacks.append(bool(fallback))
        self.assignments.append(assignment.astype(np.int16))
        self.domains.append(domain.astype(np.int16))

    def state_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in self.__dataclass_fields__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, list(state[name]))

    def save(self, out_dir: Path) -> None:
        """Write the three files atomically (each via a temp file and a rename)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        m = len(self.weights[0]) if self.weights else 0
        header = ["step", "objective_value", "fallback", *(f"w{k}" for k in range(m)),
                  *(f"n{k}" for k in range(m))]
        rows = [[s, v, int(f), *w, *n] for s, v, f, w, n in
                zip(self.steps, self.values, self.fallbacks, self.weights, self.sizes, strict=True)]
        with open_atomically(out_dir / "weights.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
        with open_atomically(out_dir / "assignments.npz", "wb") as handle:
            np.savez_compressed(handle, step=np.asarray(self.steps, dtype=np.int64), cluster=_stack(self.assignments),
                                domain=_stack(self.domains))
        with open_atomically(out_dir / "refreshes.jsonl", "w", newline="") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in self.refreshes))


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int16)


@dataclass
class DomainWeightHistory:
    """Per-step weights over human domains of a baseline mixer (docs/design.md section 3).

    ``record`` one row per step; ``save`` writes ``weights.csv`` (step, one column per
    domain, then any extra named columns) atomically; ``state_dict`` goes into checkpoints
    so a resumed run writes the same file; ``metrics`` gives ``mixer/weights/<domain>``.
    """

    domains: list[str]
    extra: list[str] = field(default_factory=list)  # names of extra per-step columns
    steps: list[int] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)

    def record(self, step: int, weights: Any, **extra: float) -> None:
        values = [float(w) for w in weights]
        if len(values) != len(self.domains):
            raise ValueError(f"{len(values)} weights for {len(self.domains)} domains")
        self.steps.append(int(step))
        self.rows.append(values + [float(extra[name]) for name in self.extra])

    def metrics(self, weights: Any) -> dict[str, Any]:
        """``mixer/weights/<domain>``; device tensors stay on the device (read at log time, no sync)."""
        return {f"mixer/weights/{d}": w for d, w in zip(self.domains, weights, strict=True)}

    def mean(self) -> list[float]:
        """The time average of the recorded weights (0 rows: an empty list)."""
        if not self.rows:
            return []
        d = len(self.domains)
        return [sum(row[i] for row in self.rows) / len(self.rows) for i in range(d)]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.rows = list(state["steps"]), [list(r) for r in state["rows"]]

    def save(self, out_dir: Path, name: str = "weights.csv") -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        header = ["step", *self.domains, *self.extra]
        rows = [[s, *r] for s, r in zip(self.steps, self.rows, strict=True)]
        with open_atomically(out_dir / name, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
