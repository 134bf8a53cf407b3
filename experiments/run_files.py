"""One run directory read back for the figures that look inside a run (Figures 1 and 3).

The index says which run an artifact reads; these helpers open that run's own files: its
config (``run_info.json``), its kept checkpoints, its model and held-out windows rebuilt as
``dograph.runs.app`` built them, and DoGraph's mixer history (``mixer/``). What a figure computes
from the checkpoints is kept beside them and in the run's record (:func:`checkpoint_points`), so a
record, which keeps no checkpoint, still draws the figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from dograph.config import RunConfig, run_config_from_dict
from dograph.data.builder import RunData, build_run_data
from dograph.distributed import DistContext
from dograph.models import build_model
from experiments.artifact import NothingToPlot
from experiments.index import DERIVED
from experiments.scale import REPO, RunRequest, Scale, find_run, make_request

CHECKPOINT = re.compile(r"^step_(\d{8})\.pt$")


def ablation_dograph_request(scale: Scale) -> RunRequest:
    """The DoGraph run of the ablation setting at the first seed (default m and objective): Figures 1 and 3."""
    where = scale.setting("ablation")
    return make_request(scale, "dograph", where["model"], where["dataset"], scale.seeds[0], sweep="m_sweep")


def run_and_record_of(index: pd.DataFrame, request: RunRequest) -> tuple[Path, Path | None]:
    """The run of ``request`` completed last and its record (None without one); :class:`NothingToPlot` when none."""
    found = find_run(index, request)
    if found.empty:
        raise NothingToPlot(f"no complete run for {request.label()}")
    row = found.iloc[-1]
    record = row.get("record") if "record" in found.columns else None
    return Path(row["run_dir"]), Path(record) if isinstance(record, str) else None


def checkpoint_points(run_dir: Path, record: Path | None, name: str,
                      compute: Callable[[Path], pd.DataFrame | None],
                      current: Callable[[pd.DataFrame], bool] | None = None) -> pd.DataFrame | None:
    """Points a figure computes from ``run_dir``'s checkpoints, kept as ``derived/<name>.csv``.

    A record keeps no checkpoints, so the points computed from the live run are written into the run
    and into its record (``record``); later builds (a fresh clone's from the record alone included)
    read them back. Always returned as read back from the CSV, so the figure drawn from a live run and
    from its record are the same bytes. ``compute`` may return None (nothing to draw from).
    ``current``: whether a kept file is what the caller's code would compute (e.g. it has the columns the
    caller reads); one that is not (written by older code) is computed again where the checkpoints still
    are, else returned as it is.
    """
    cached = run_dir / DERIVED / f"{name}.csv"
    if cached.exists():
        kept = pd.read_csv(cached)
        if current is None or current(kept):
            return kept
        frame = compute(run_dir)
        if frame is None:
            return kept
    else:
        frame = compute(run_dir)
    if frame is None:
        return None
    for where in (run_dir, record):
        if where is not None:
            (where / DERIVED).mkdir(exist_ok=True)
            frame.to_csv(where / DERIVED / f"{name}.csv", index=False)
    return pd.read_csv(cached)


def checkpoints_of(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints kept in ``run_dir/checkpoints`` as (step, path), oldest first."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := CHECKPOINT.match(path.name))]
    return sorted(found)


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's resolved config (``run_info.json``), relative paths taken from the repository root.

    ``run.py`` runs from the repository root (Hydra does not change directory), so a relative
    cache or corpus path means the same place whatever the caller's working directory.
    """
    info = json.loads((run_dir / "run_info.json").read_text())
    cfg = run_config_from_dict(info["config"])
    cache = Path(cfg.paths.cache_dir)
    paths = replace(cfg.paths, cache_dir=str(cache if cache.is_absolute() else REPO / cache))
    dataset = cfg.dataset
    if dataset.path and not Path(dataset.path).is_absolute() and (REPO / dataset.path).exists():
        dataset = replace(dataset, path=str(REPO / dataset.path))
    return replace(cfg, paths=paths, dataset=dataset)


def rebuild_data(cfg: RunConfig) -> RunData:
    """The run's corpus, tokenizer and held-out validation windows (same config, same caches: same windows)."""
    return build_run_data(cfg.dataset, tokenizer_name=cfg.tokenizer, seq_len=cfg.trainer.seq_len,
                          cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed, dist=DistContext())


def rebuild_model(cfg: RunConfig, tok: Any, weights: dict[str, Any]) -> nn.Module:
    """The run's model architecture (as ``dograph.runs.app`` builds it for the tokenizer ``tok``) holding a
    checkpoint's weights, in eval mode."""
    model = build_model(cfg.model, len(tok), bos_id=tok.eos_token_id, eos_id=tok.eos_token_id, seed=cfg.seed)
    model.load_state_dict(weights)
    return model.eval()


def read_refreshes(run_dir: Path) -> list[dict[str, Any]]:
    """DoGraph's K-means refreshes (``mixer/refreshes.jsonl``), in order; [] when the file is missing."""
    path = run_dir / "mixer" / "refreshes.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def domains_of_run(run_dir: Path, count: int) -> list[str]:
    """The run's human domains in id order (``summary.json``); ``domain <i>`` when it does not say."""
    path = run_dir / "summary.json"
    if path.exists():
        domains = json.loads(path.read_text()).get("domains") or []
        if len(domains) == count:
            return [str(d) for d in domains]
    return [f"domain {i}" for i in range(count)]
