"""The planted study's measures of one run, read from its own files, so a run record alone gives them (issue 18).

From ``summary.json`` (``natural_mixture``, ``final_eval``, ``planted``: ``dograph.eval.planted``) and
``metrics.jsonl`` (its ``train`` records); docs/design.md section 4.5 says why each is defined so:

* the **clean validation loss**: ``val/<domain>/loss`` averaged with the natural shares renormalised over
  the clean domains: every domain but the planted one for noise and duplicates (its text is the
  planted structure: word salad, copies), every domain for hidden_split (merged text is clean text);
* the planted domain's **effective weight** over training, one value per ``train`` record: the share
  of the sample weights its samples carried (``train/effective_mixture``, the steps the mixer weighed:
  Loss-based, DoGraph) or else the sampling mixture in effect (``data/mixture/<domain>``: the mixture
  methods, Uniform, and the reweighting methods' warm-up; a window that starts weighing midway blends
  the two by its share of unweighed steps, ``mixer/warmup`` or ``mixer/burn_in``); its **time average**
  weighs each record by the steps it covers. Compared with the domain's natural share as a ratio
  (below 1: down-weighted);
* duplicates: the loss on the replaced domain's **fresh documents** (never trained on), as the run scored
  them when its ``fresh.sample`` is the current rule (``dograph.eval.planted.FRESH_SAMPLE``); a run that
  scored another sample (made before the rule, or under another) gives None here and ``RESCORE`` 1, and
  the table re-scores it from its final checkpoint (``experiments.planted_fresh``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.scale import RunRequest, rows_for

CLEAN = "planted/clean_loss"
WEIGHT = "planted/weight"
SHARE = "planted/share"
RATIO = "planted/weight_ratio"
FRESH = "planted/fresh_loss"
RESCORE = "planted/fresh_rescore"  # 1.0: the run scored another fresh sample than the current one
DOMAIN = "planted/domain"
MEASURES = (CLEAN, WEIGHT, SHARE, RATIO, FRESH, RESCORE, DOMAIN)
CURVE_COLUMNS = ["step", "weight", "source"]
# The share of a log window's steps a reweighting mixer did not weigh (the plain mean): DoGraph's warm-up, Loss-based's
# burn-in; train/effective_mixture covers the weighed steps only.
WARMUP_KEYS = ("mixer/warmup", "mixer/burn_in")


@dataclass(frozen=True)
class PlantedRun:
    """What ``summary.json`` says of a completed run on a planted corpus."""

    domains: list[str]
    natural: dict[str, float]  # the natural mixture, per domain
    final_eval: dict[str, Any]
    domain: str  # the planted domain
    fresh_loss: float | None  # duplicates: the loss on the fresh documents of the current sample (None: none)
    fresh_rescore: bool  # duplicates: the run scored another sample than the current one (experiments.planted_fresh)


def read_planted_run(run_dir: Path) -> PlantedRun | None:
    """The run's planted facts, or None when its summary lacks them (a run made before they were written)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    planted, natural = summary.get("planted"), summary.get("natural_mixture")
    if not isinstance(planted, dict) or not isinstance(natural, dict):
        return None
    fresh, rescore = None, False
    if isinstance(planted.get("fresh"), dict):
        from dograph.eval.planted import FRESH_SAMPLE  # torch: only for a duplicates run

        current = planted["fresh"].get("sample") == FRESH_SAMPLE
        fresh, rescore = (planted["fresh"].get("loss") if current else None), not current
    return PlantedRun(list(summary.get("domains") or natural), {d: float(s) for d, s in natural.items()},
                      dict(summary.get("final_eval") or {}), str(planted["domain"]),
                      None if fresh is None else float(fresh), rescore)


def clean_loss(final_eval: Mapping[str, Any], natural: Mapping[str, float], leave_out: str | None) -> float | None:
    """The natural-share average of ``val/<domain>/loss`` over every domain but ``leave_out`` (None: a loss lacks)."""
    kept = {d: s for d, s in natural.items() if d != leave_out}
    losses = [final_eval.get(f"val/{d}/loss") for d in kept]
    total = sum(kept.values())
    if not kept or total <= 0 or any(not isinstance(x, int | float) or math.isnan(x) for x in losses):
        return None
    return sum(s * float(x) for s, x in zip(kept.values(), losses, strict=True)) / total


def weight_curve(run_dir: Path, domain: str, domains: Sequence[str]) -> pd.DataFrame:
    """The domain's effective weight per ``train`` record: step, weight, source (``weights`` | ``mixture``)."""
    index = list(domains).index(domain)
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("kind") != "train":
            continue
        effective = record.get("train/effective_mixture")
        mixture = record.get(f"data/mixture/{domain}")
        if isinstance(effective, list) and len(effective) == len(domains):
            weight = float(effective[index])  # over the window's weighed steps only
            plain = next((record[k] for k in WARMUP_KEYS if isinstance(record.get(k), int | float)), 0.0)
            if 0.0 < plain < 1.0 and isinstance(mixture, int | float):  # a window that starts weighing midway
                weight = plain * float(mixture) + (1.0 - plain) * weight
            rows.append({"step": int(record["step"]), "weight": weight, "source": "weights"})
        elif isinstance(mixture, int | float):
            rows.append({"step": int(record["step"]), "weight": float(mixture), "source": "mixture"})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def time_average(curve: pd.DataFrame) -> float | None:
    """The mean of ``weight`` over training: each record weighs the steps since the record before it."""
    if curve.empty:
        return None
    steps = curve["step"].diff().fillna(curve["step"].iloc[0]).clip(lower=0)
    if steps.sum() <= 0:
        return float(curve["weight"].mean())
    return float((curve["weight"] * steps).sum() / steps.sum())


def run_measures(run_dir: Path, leave_out_planted: bool) -> dict[str, Any]:
    """The measures of one run (:data:`MEASURES`; {} when it is no planted run)."""
    run = read_planted_run(run_dir)
    if run is None:
        return {}
    weight = time_average(weight_curve(run_dir, run.domain, run.domains))
    share = run.natural.get(run.domain)
    return {CLEAN: clean_loss(run.final_eval, run.natural, run.domain if leave_out_planted else None),
            WEIGHT: weight, SHARE: share, RATIO: None if weight is None or not share else weight / share,
            FRESH: run.fresh_loss, RESCORE: float(run.fresh_rescore), DOMAIN: run.domain}


def measured_rows(index: pd.DataFrame, requests: Sequence[RunRequest], leave_out_planted: bool) -> pd.DataFrame:
    """The complete runs of ``requests`` (one each, as ``rows_for``) with the columns :data:`MEASURES` added."""
    rows = rows_for(index, list(requests)).copy()
    values = [run_measures(Path(run_dir), leave_out_planted) for run_dir in rows["run_dir"]] if len(rows) else []
    for key in MEASURES:
        rows[key] = pd.Series([v.get(key) for v in values], index=rows.index, dtype=object if key == DOMAIN
                              else float)
    return rows


def weight_curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Every run's curve (:func:`weight_curve`) with its method and seed, in the rows' order."""
    frames = []
    for _, row in rows.iterrows():
        run = read_planted_run(Path(row["run_dir"]))
        if run is None:
            continue
        curve = weight_curve(Path(row["run_dir"]), run.domain, run.domains)
        frames.append(curve.assign(method=row["method"], seed=int(row["seed"])))
    if not frames:
        return pd.DataFrame(columns=["method", "seed", *CURVE_COLUMNS])
    return pd.concat(frames, ignore_index=True)[["method", "seed", *CURVE_COLUMNS]]
