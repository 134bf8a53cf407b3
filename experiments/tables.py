"""Table cells and the kinds of table several artifacts share (``experiments.paper`` gives each its parameters).

A cell is mean ± the half-width of a 95% Student-t interval over seeds (``stats.py``). A method
table (Tables 1-5) has a row per method of the scale, over every method x seed of one of the
paper's settings (``conf/reproduce/<scale>.yaml``: ``settings.<setting>`` names the model and
dataset standing for it); a proportions table (Tables 6-7) reads a corpus, not runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.index import domains_of
from experiments.render import NOT_AVAILABLE, Table
from experiments.scale import RunRequest, Scale, method_requests, model_tokenizer, rows_for
from experiments.stats import Estimate, mean_ci

# The paper's names for the methods (docs/design.md section 3)
METHOD_NAMES = {
    "uniform": "Uniform", "loss_based": "Loss-based", "doremi": "DoReMi", "doge": "DoGE", "regmix": "RegMix",
    "data_mixing_law": "Data Mixing Laws", "dograph": "DoGraph", "fixed": "Fixed mixture",
}
CI_NOTE = "Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds); one seed has no interval."
# The methods whose earlier runs are seeded by their own keys (mixer.<stage>.seed, sweep_seed), not by the main
# run's seed, so every main-run seed reuses one of them (docs/design.md section 3.1): what they train first.
STAGED_METHODS = {"doremi": "reference and proxy", "doge": "proxy", "regmix": "proxy sweep",
                  "data_mixing_law": "proxy sweep"}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


@dataclass(frozen=True)
class Column:
    """A table column: its header and how one run's row gives its value (None when the run lacks it)."""

    header: str
    value: Callable[[pd.Series], float | None]
    digits: int = 2
    when_equal: str | None = None  # said instead of "± 0" when every seed gives the same value (a shared stage's)

    def cell(self, rows: pd.DataFrame) -> str:
        """The column's mean ± CI over ``rows`` (one run per seed) as a table cell; with ``when_equal``, values
        equal to 1e-9 of their largest magnitude (a ratio of equal numbers may differ in its last bits) are said
        to be equal."""
        values = [v for _, row in rows.iterrows() if (v := self.value(row)) is not None and not math.isnan(v)]
        found = mean_ci(values)
        spread = max(values) - min(values) if values else math.nan
        if self.when_equal and found.n > 1 and spread <= 1e-9 * max(abs(v) for v in values):
            return f"{found.mean:.{self.digits}f} ({self.when_equal}, n={found.n})"
        return found.format(self.digits)


def metric(column: str, factor: float = 1.0) -> Callable[[pd.Series], float | None]:
    """A row's ``column`` times ``factor`` (None when absent or NaN)."""
    def read(row: pd.Series) -> float | None:
        value = row.get(column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return float(value) * factor
    return read


def ppl_of(column: str) -> Callable[[pd.Series], float | None]:
    """exp of a row's mean token loss."""
    read = metric(column)
    return lambda row: None if (v := read(row)) is None else math.exp(min(v, 50.0))


def estimate(rows: pd.DataFrame, column: Column) -> Estimate:
    return mean_ci([v for _, row in rows.iterrows() if (v := column.value(row)) is not None])


def method_rows(index: pd.DataFrame, requests: Sequence[RunRequest], columns: Sequence[Column],
                methods: Sequence[str]) -> list[list[str]]:
    """One table row per method: its name, then each column's mean ± CI over the method's seeds.

    A method with no complete run gets "not available" cells (never a number).
    """
    out = []
    for method in methods:
        rows = rows_for(index, [r for r in requests if r.method == method])
        if rows.empty:
            out.append([method_name(method), *([NOT_AVAILABLE] * len(columns))])
            continue
        out.append([method_name(method), *(c.cell(rows) for c in columns)])
    return out


def missing_note(index: pd.DataFrame, requests: Sequence[RunRequest]) -> list[str]:
    """Notes naming the runs a table lacks and the runs that ended without a finite validation loss (a
    diverged run is complete, but no cell can use it: it is named rather than silently dropped)."""
    found = {r: rows_for(index, [r]) for r in requests}
    missing = [r for r, rows in found.items() if rows.empty]
    diverged = [r for r, rows in found.items() if not rows.empty and "val/avg_loss" in rows
                and not np.isfinite(pd.to_numeric(rows["val/avg_loss"], errors="coerce").astype(float)).all()]
    notes = []
    if missing:
        notes.append(f"{len(missing)} of {len(requests)} runs are missing (not available): "
                     + "; ".join(r.label() for r in missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if diverged:
        notes.append(f"{len(diverged)} of {len(requests)} runs ended without a finite validation loss (diverged; "
                     "left out of every cell that needs a loss): " + "; ".join(r.label() for r in diverged[:6])
                     + (" ..." if len(diverged) > 6 else ""))
    return notes


def shared_stage_note(methods: Sequence[str]) -> list[str]:
    """Why a staged method's interval is narrower in meaning than DoGraph's (empty when no method is staged)."""
    staged = [m for m in methods if m in STAGED_METHODS]
    if not staged:
        return []
    which = ", ".join(f"{method_name(m)} ({STAGED_METHODS[m]})" for m in staged)
    return [f"Shared stages: {which}: trained once and reused by every main-run seed (a stage's seed is its own, "
            "mixer.<stage>.seed or sweep_seed, not seed), so these intervals cover main-run noise only; the other "
            "methods' intervals cover the whole method."]


def mixed_eval_note(rows: pd.DataFrame) -> list[str]:
    """One line when the runs' downstream scores were made with more than one eval setting (empty otherwise)."""
    settings = rows["downstream/setting"].dropna().value_counts() if "downstream/setting" in rows else []
    if len(settings) < 2:
        return []
    listed = " | ".join(f"{setting}: {count} runs" for setting, count in settings.items())
    return [f"Downstream scores not shown: these runs were evaluated with {len(settings)} settings ({listed}); "
            "scores of different task sets, num_fewshot or limit are never averaged or compared. Evaluate them "
            "all with one setting (python -m dograph.eval RUN_DIR eval=...)."]


def _task_column(index: pd.DataFrame, task: str) -> Column:
    metrics = index.get(f"downstream/{task}/metric")
    name = str(metrics.dropna().iloc[0]) if metrics is not None and not metrics.dropna().empty else "acc"
    percent = name.startswith("acc")
    label = f"{task} ({name}{', %' if percent else ''})"
    return Column(label, metric(f"downstream/{task}/score", 100.0 if percent else 1.0), 1 if percent else 2)


def downstream_columns(rows: pd.DataFrame) -> list[Column]:
    """A column per downstream task the runs were evaluated on (accuracies in %), then their average."""
    tasks = [c.split("/")[1] for c in rows.columns if c.startswith("downstream/") and c.endswith("/score")
             and rows[c].notna().any()]
    columns = [_task_column(rows, t) for t in tasks]
    if tasks:
        columns.append(Column("Avg (%)", metric("downstream/avg", 100.0), 1))
    return columns


def scale_title(title: str, scale: Scale, setting: str) -> str:
    """An artifact's title with the scale and the model and dataset standing for its paper setting."""
    where = scale.setting(setting)
    return f"{title} - scale {scale.name}: {where['model']} on {where['dataset']}"


VAL_LOSS = Column("Val loss (avg)", metric("val/avg_loss"), 3)
PAIRED_NOTE = ("Δ vs Uniform: per seed, the method's average loss minus Uniform's at the same seed, mean ± the 95% "
               "t-interval over the seeds both have (a paired difference: below 0 is better than Uniform; an "
               "interval that excludes 0 is a difference these seeds resolve).")


def paired_difference(index: pd.DataFrame, requests: Sequence[RunRequest], column: str,
                      reference: str = "uniform", header: str | None = None) -> Column | None:
    """A column of each run's ``column`` minus the ``reference`` method's at the same seed (None: no reference run).

    ``header`` defaults to "Δ vs <reference>"; ``index`` may be any frame of index rows with ``column`` added.

    Seeds pair runs that share the initialisation and the seed of everything else, so the paired
    difference cancels the seed-to-seed spread both methods share.
    """
    ref_rows = rows_for(index, [r for r in requests if r.method == reference])
    by_seed = {int(row["seed"]): float(row[column]) for _, row in ref_rows.iterrows()
               if column in row and pd.notna(row[column])}
    if not by_seed:
        return None

    def read(row: pd.Series) -> float | None:
        value = metric(column)(row)
        seed = int(row["seed"])
        return None if value is None or seed not in by_seed else value - by_seed[seed]

    return Column(header or f"Δ vs {method_name(reference)}", read, 3)
LOSS_NOTE = "Loss: mean token cross-entropy in nats; Avg: weighted by the natural mixture; PPL = exp(Avg loss)."
NO_DOWNSTREAM = ("No run of this table has a downstream evaluation (eval.tasks was empty): the task columns are not "
                 "available; `python -m dograph.eval RUN_DIR eval=paper` adds them.")


@dataclass(frozen=True)
class MethodTable:
    """Every method x seed of the scale on one paper setting; a row per method (mean ± CI over seeds)."""

    name: str
    title: str
    setting: str

    def requests(self, scale: Scale) -> list[RunRequest]:
        return method_requests(scale, self.setting)

    def run_notes(self, index: pd.DataFrame, scale: Scale) -> list[str]:
        """Why the staged methods' intervals are narrower in meaning, and which runs are missing."""
        return [*shared_stage_note(scale.methods), *missing_note(index, self.requests(scale))]

    def write(self, index: pd.DataFrame, scale: Scale, out_dir: Path, columns: list[Column], notes: list[str]
              ) -> list[Path]:
        rows = method_rows(index, self.requests(scale), columns, scale.methods)
        return Table(self.name, scale_title(self.title, scale, self.setting), ["Method", *(c.header for c in columns)],
                     rows, notes).write(out_dir)


@dataclass(frozen=True)
class DownstreamTable(MethodTable):
    """Methods x downstream tasks (Tables 1, 3-5): a column per task the runs were evaluated on and their average;
    with ``val_loss``, the natural-mixture validation loss too.

    Scores made with different eval settings are never averaged: the task columns go, and a note says why.
    """

    val_loss: bool = False

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        runs = rows_for(index, self.requests(scale))
        mixed = mixed_eval_note(runs)
        tasks = [] if mixed else downstream_columns(runs)
        notes = [CI_NOTE, *self.run_notes(index, scale), *mixed, *([] if tasks or mixed else [NO_DOWNSTREAM])]
        return self.write(index, scale, out_dir, [*tasks, *([VAL_LOSS] if self.val_loss else [])], notes)


@dataclass(frozen=True)
class DomainLossTable(MethodTable):
    """Validation loss per human domain and its natural-mixture average, per method (Table 2).

    The paper's "PPL" values (3.09 to 4.51) look like mean token loss (docs/design.md section 1), so
    the domains are reported as loss in nats and the average both as loss and as exp(loss).
    """

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        runs = rows_for(index, self.requests(scale))
        domains = domains_of(runs.dropna(axis=1, how="all")) if not runs.empty else []
        columns = [Column(d, metric(f"val/{d}/loss"), 3) for d in domains]
        columns += [Column("Avg loss", metric("val/avg_loss"), 3), Column("Avg PPL", ppl_of("val/avg_loss"), 2),
                    Column("Worst loss", metric("val/worst_loss"), 3)]
        paired = paired_difference(index, self.requests(scale), "val/avg_loss")
        columns += [paired] if paired is not None else []
        notes = [CI_NOTE, LOSS_NOTE, *([PAIRED_NOTE] if paired is not None else []), *self.run_notes(index, scale)]
        return self.write(index, scale, out_dir, columns, notes)


@dataclass(frozen=True)
class ProportionsTable:
    """A corpus's domain proportions, measured from its documents: bytes, documents, tokens (Tables 6-7).

    The corpus is the scale's ``corpora.<name>``, its tokens counted by the tokenizer of the setting's model.
    """

    name: str
    title: str
    setting: str

    def requests(self, scale: Scale) -> list[RunRequest]:
        return []

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        from experiments.proportions import write_proportions  # dograph's data stack: imported when built

        tokenizer = model_tokenizer(scale.setting(self.setting)["model"])
        return write_proportions(self.name, self.title, scale.corpora[self.name], tokenizer, scale, out_dir)
