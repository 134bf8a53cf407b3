"""Run metrics: ``metrics.jsonl`` (always, rank 0) and Weights & Biases (optional).

Per-step values stay tensors on the device until the log interval (``MetricAccumulator``),
so logging adds no host synchronisation to the steps in between.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dograph.atomic import write_text_atomically
from dograph.config import LoggerConfig


def to_python(value: Any) -> Any:
    """A JSON-ready value: tensors become floats or (nested) lists; non-finite floats become None."""
    if isinstance(value, Tensor):
        value = value.detach().float().cpu()
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    return value


class MetricAccumulator:
    """Collects per-step metrics; ``flush`` averages scalars and keeps the last of vectors.

    The pending window is part of a checkpoint (``state_dict``, ``Stateful`` of
    ``torch.distributed.checkpoint``), so the first record after a resume averages the same
    steps as an uninterrupted run's. Restored tensors go back to ``device`` (that of the steps).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self._values: dict[str, list[Any]] = {}
        self.device = device

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self._values.setdefault(key, []).append(value.detach() if isinstance(value, Tensor) else value)

    def pop(self, key: str) -> list[Any]:
        """Remove and return the window's values of ``key`` (for metrics reduced elsewhere)."""
        return self._values.pop(key, [])

    def state_dict(self) -> dict[str, list[Any]]:
        """The pending window on the host; lazy timers are read (a CUDA timer waits for its events)."""
        return {key: [_portable(v) for v in values] for key, values in self._values.items()}

    def load_state_dict(self, state_dict: dict[str, list[Any]]) -> None:
        device = self.device
        self._values = {key: [v.to(device) if isinstance(v, Tensor) and device is not None else v for v in values]
                        for key, values in state_dict.items()}

    def flush(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, values in self._values.items():
            if not all(_is_scalar(v) for v in values):
                out[key] = values[-1]
            elif all(isinstance(v, Tensor) for v in values):  # one device op, one host copy
                out[key] = torch.stack([v.float() for v in values]).mean()
            else:  # floats, or lazy timers read now (float() of a CUDA timer waits for its events)
                out[key] = sum(float(v) for v in values) / len(values)
        self._values.clear()
        return {k: to_python(v) for k, v in out.items()}


def _portable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, int | float | str | list | tuple | dict) or not hasattr(value, "__float__"):
        return value
    return float(value)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0
    return not isinstance(value, list | tuple | dict | str) and hasattr(value, "__float__")


class MetricsWriter:
    """Writes one JSON object per record to ``run_dir/metrics.jsonl``; mirrors it to W&B."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, *, enabled: bool, config: dict[str, Any],
                 run_name: str, resume: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb_run = None
        if enabled and cfg.mode != "disabled":
            id_file = run_dir / "wandb_id"  # a resumed run continues the same W&B run
            resume_id = id_file.read_text().strip() if resume and id_file.exists() else None
            self.wandb_run = _init_wandb(run_dir, cfg, config, run_name, resume_id)
            id_file.write_text(self.wandb_run.id)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()  # a downstream record's step may be null
                if line.strip() and (json.loads(line).get("step") or 0) <= step]
        write_text_atomically(self.path, "".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **to_python(values)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.wandb_run.log({f"{kind}/{k}" if "/" not in k else k: v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(run_dir: Path, cfg: LoggerConfig, config: dict[str, Any], run_name: str,
                resume_id: str | None) -> Any:
    import wandb

    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, mode=cfg.mode,
                      dir=str(run_dir), config=config, id=resume_id, resume="allow" if resume_id else None,
                      settings=wandb.Settings(silent=True))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
