"""One planted scenario's artifact: its table and its figure (issue 18; the entries are in ``experiments.planted``).

Every method x seed of the scale on one scenario (``dataset=planted dataset.planted.scenario=...``).
The table has a row per method: the clean validation loss and its paired difference against
Uniform at the same seed, the planted domain's effective weight (time average) and its ratio to the
domain's natural share; for duplicates the loss on the fresh documents (and its paired difference);
for hidden_split the agreement of DoGraph's clusters with the hidden and the given labels at the
last kept checkpoint, where the other methods' cells say why they have none. The figure draws the
planted domain's effective weight over training, one line per method (mean over seeds), and for
hidden_split DoGraph's agreement at every kept checkpoint beside it. The measures:
``experiments.planted_measures`` and ``experiments.planted_clusters``; docs/design.md section 4.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.planted_measures import (
    CLEAN,
    DOMAIN,
    FRESH,
    RATIO,
    RESCORE,
    SHARE,
    WEIGHT,
    measured_rows,
    weight_curves,
)
from experiments.render import Table, save_figure
from experiments.scale import RunRequest, Scale, make_request
from experiments.stats import mean_ci
from experiments.tables import (
    CI_NOTE,
    Column,
    method_name,
    method_rows,
    metric,
    missing_note,
    paired_difference,
    scale_title,
    shared_stage_note,
)

CLUSTERS_FILE = "planted_clusters"  # derived/<this>.csv of a DoGraph run: experiments.planted_clusters
CLUSTER_COLUMNS = (("ARI vs hidden", "ari_hidden"), ("ARI vs given", "ari_given"), ("NMI vs hidden", "nmi_hidden"),
                   ("NMI vs given", "nmi_given"), ("ARI within {domain}", "ari_split"),
                   ("Homogeneity within {domain}", "homogeneity_split"),
                   ("Homogeneity at chance", "homogeneity_chance"))
# Why a method's cluster cells hold no number (docs/design.md section 4.5).
NO_CLUSTERS = {"uniform": "does not adapt", "loss_based": "no clusters (weighs samples by loss)"}
LABEL_BLIND = "cannot see the split (weighs the given domains)"
PAIRED = ("Δ: per seed, the method's value minus Uniform's at the same seed, mean ± the 95% t-interval over the "
          "seeds both have (paired: below 0 is better than Uniform; an interval that excludes 0 is resolved against "
          "the noise it covers, for a staged method main-run noise only: see Shared stages).")
EQUAL = "equal in every seed"  # a weight cell whose seeds agree: a shared stage's mixture, Uniform's natural share
WEIGHT_NOTE = ("Weight: the planted domain's effective weight averaged over training (each log record weighted by "
               "the steps it covers): the share of the sample weights on its samples for the steps a mixer "
               "weighed (Loss-based, DoGraph), else the sampling mixture in effect (the mixture methods, "
               "Uniform, warm-up); ÷ natural share (its share of the corpus's text bytes, which is Uniform's "
               "sampling mixture) below 1 means it was given less than its natural share.")


@dataclass(frozen=True)
class PlantedScenario:
    """The table and the figure of one scenario; ``leave_out_planted``: the clean loss drops the planted domain."""

    name: str  # file stem, e.g. planted_noise
    title: str
    scenario: str  # dataset.planted.scenario
    domain: str  # the planted domain at the scenario's defaults (the runs' own name it when they exist)
    right_answer: str  # one line under the table: what a method should do here
    leave_out_planted: bool = True
    fresh: bool = False  # duplicates: the loss on the fresh documents
    clusters: bool = False  # hidden_split: DoGraph's clusters vs the hidden and given labels
    setting: str = "planted"  # the scale's settings.<setting>: model and dataset

    def requests(self, scale: Scale) -> list[RunRequest]:
        if self.scenario not in scale.scenarios:
            raise ValueError(f"conf/reproduce/{scale.name}.yaml has no scenario {self.scenario!r} "
                             f"(scenarios: {scale.scenarios or 'none'}): build {self.name} with --scale planted")
        where = scale.setting(self.setting)
        return [make_request(scale, method, where["model"], where["dataset"], seed, scenario=self.scenario,
                             sweep="planted") for method in scale.methods for seed in scale.seeds]

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        requests = self.requests(scale)
        rows = measured_rows(index, requests, self.leave_out_planted)
        if self.fresh:
            rows = _with_rescored_fresh(rows)
        domain = _first(rows, DOMAIN) or self.domain
        share = _first(rows, SHARE)
        clusters = self._clusters(rows) if self.clusters else None
        if clusters is not None:
            rows = _with_last_checkpoint(rows, clusters)
        columns, notes = self._columns(rows, requests, domain, share, clusters)
        cells = method_rows(rows, requests, columns, scale.methods)
        if self.clusters:
            _explain_cluster_cells(cells, scale.methods, len(CLUSTER_COLUMNS))
        notes += [*shared_stage_note(scale.methods), *missing_note(index, requests), *self._unmeasured_note(rows)]
        paths = Table(self.name, scale_title(self.title, scale, self.setting), ["Method", *(c.header for c in columns)],
                      cells, notes).write(out_dir)
        curves = weight_curves(rows)
        if curves.empty:
            return paths  # no run yet: the table says which are missing; no empty figure
        data = {"curves": curves, **({"clusters": clusters} if clusters is not None and not clusters.empty else {})}
        return paths + save_figure(self.draw(curves, data.get("clusters"), scale, domain, share), out_dir, self.name,
                                   data)

    def _columns(self, rows: pd.DataFrame, requests: list[RunRequest], domain: str, share: float | None,
                 clusters: pd.DataFrame | None) -> tuple[list[Column], list[str]]:
        clean = (f"every domain but {domain}, their natural shares renormalised" if self.leave_out_planted else
                 "every domain with its natural share (val/avg_loss: the merged text is clean text)")
        columns = [Column("Clean val loss", metric(CLEAN), 3), *_paired(rows, requests, CLEAN, "Δ clean vs Uniform")]
        notes = [CI_NOTE, f"Right answer: {self.right_answer}",
                 f"Clean val loss: the final validation loss (nats) averaged over {clean}; each cell is over the "
                 "method's own seeds, so only the Δ columns compare methods seed for seed.",
                 *([PAIRED] if len(columns) > 1 else []), WEIGHT_NOTE]
        natural = f" ({share:.3f})" if share is not None else ""
        columns += [Column(f"{domain} weight", metric(WEIGHT), 3, when_equal=EQUAL),
                    Column(f"÷ natural share{natural}", metric(RATIO), 2, when_equal=EQUAL)]
        if self.fresh:
            from dograph.eval.planted import FRESH_SAMPLE  # torch: only when a duplicates table is built

            replaced = domain.removesuffix("-dup")
            columns += [Column(f"Fresh {replaced} loss", metric(FRESH), 3)]
            columns += _paired(rows, requests, FRESH, "Δ fresh vs Uniform")
            notes.append(f"Fresh {replaced} loss: the final model's loss on the documents of {replaced} that were "
                         f"not duplicated, never trained on. Sample: {FRESH_SAMPLE}. A run that scored an older "
                         "sample is re-scored from its final checkpoint (experiments.planted_fresh).")
        if self.clusters:
            from experiments.planted_clusters import WINDOWS_PER_GROUP  # torch: only when a hidden_split table is built

            step = f" at step {int(clusters['step'].max())}" if clusters is not None and not clusters.empty else ""
            columns += [Column(header.format(domain=domain), metric(f"clusters/{key}"), 2)
                        for header, key in CLUSTER_COLUMNS]
            notes += [f"Clusters (DoGraph){step}, its last kept checkpoint: ARI and NMI of the clusters its centroids "
                      f"give held-out windows (up to {WINDOWS_PER_GROUP} per domain and per hidden half, each "
                      "inside one document) against the given labels (" + domain + " one domain) and the hidden "
                      "ones (its two halves). Within " + domain + ": its windows alone against the hidden labels; "
                      "ARI is 0 at chance and 1 only when each half is one cluster of its own (a clean cut into "
                      "3 + 2 clusters scores about 0.4); homogeneity is 1 whenever no cluster mixes the halves, "
                      "however many clusters each takes, and is not corrected for chance: at chance, its mean over "
                      "200 shuffles of the halves' labels among the same clusters. Every kept checkpoint: "
                      f"{self.name}_clusters.csv and the figure.",
                      "DoReMi, DoGE, RegMix and Data Mixing Laws weigh the human domains they are given: " + domain
                      + " is one domain to them, so they cannot react to the split, only to the merged domain as a "
                      "whole (its weight). Loss-based weighs each sample by its loss and has no clusters; Uniform "
                      "does not adapt."]
        return columns, notes

    def _unmeasured_note(self, rows: pd.DataFrame) -> list[str]:
        """Complete runs that a cell needs and cannot use, named rather than silently dropped (n then shrinks)."""
        if not len(rows):
            return []

        def named(mask: pd.Series) -> str:
            return "; ".join(f"{method_name(m)} seed {int(s)}" for m, s in zip(rows.loc[mask, "method"],
                                                                               rows.loc[mask, "seed"], strict=True))

        facts = rows[DOMAIN].isna()
        lacking = {"Complete runs without planted facts in summary.json (made before they were written; no cell "
                   "uses them)": facts}
        if self.fresh:
            older = rows[RESCORE] == 1.0
            lacking["Runs without a fresh-document loss of this sample (they scored another, and no checkpoint of "
                    "their last step is here to re-score)"] = ~facts & older & rows[FRESH].isna()
            lacking["Runs whose fresh-document loss is not finite"] = ~facts & ~older & rows[FRESH].isna()
        if self.clusters:
            lacking["DoGraph runs without cluster rows (no kept checkpoint with K-means centroids)"] = (
                ~facts & (rows["method"] == "dograph") & rows[f"clusters/{CLUSTER_COLUMNS[0][1]}"].isna())
        return [f"{what}: {named(mask)}." for what, mask in lacking.items() if mask.any()]

    def _clusters(self, rows: pd.DataFrame) -> pd.DataFrame:
        """DoGraph's agreement at every kept checkpoint, per run (computed once, kept in ``derived/``)."""
        from experiments.planted_clusters import cluster_agreement  # torch and the corpus: only when needed
        from experiments.run_files import checkpoint_points

        frames = []
        for _, row in rows[rows["method"] == "dograph"].iterrows():
            record = row.get("record")
            points = checkpoint_points(Path(row["run_dir"]), Path(record) if isinstance(record, str) else None,
                                       CLUSTERS_FILE, cluster_agreement, current=has_cluster_columns)
            if points is not None:
                frames.append(points.assign(method=row["method"], seed=int(row["seed"])))
        if not frames:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        return frame[["method", "seed", *(c for c in frame.columns if c not in ("method", "seed"))]]

    def draw(self, curves: pd.DataFrame, clusters: pd.DataFrame | None, scale: Scale, domain: str,
             share: float | None) -> Any:
        """(a) the planted domain's effective weight over training per method; (b) hidden_split: DoGraph's ARI."""
        import matplotlib.pyplot as plt

        panels = 2 if clusters is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.2), squeeze=False)
        ax = axes[0][0]
        for method in scale.methods:
            runs = curves[curves["method"] == method]
            if not runs.empty:
                mean = runs.groupby("step")["weight"].mean()
                seeds = runs["seed"].nunique()
                ax.plot(mean.index, mean.to_numpy(), marker=".", markersize=3, label=f"{method_name(method)} "
                        f"(n={seeds})")
        if share is not None:
            ax.axhline(share, color="gray", linestyle="--", zorder=1, label=f"natural share {share:.3f}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"effective weight of {domain}")
        ax.set_title(f"(a) {domain}: effective weight over training (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7)
        if clusters is not None:
            _agreement_panel(axes[0][1], clusters, domain)
        fig.suptitle(f"{self.title} (scale {scale.name})", fontsize=10)
        fig.tight_layout()
        return fig


def _first(rows: pd.DataFrame, column: str) -> Any:
    values = rows[column].dropna() if column in rows else []
    return values.iloc[0] if len(values) else None


def _paired(rows: pd.DataFrame, requests: list[RunRequest], column: str, header: str) -> list[Column]:
    paired = paired_difference(rows, requests, column, header=header)
    return [paired] if paired is not None else []


def has_cluster_columns(kept: pd.DataFrame) -> bool:
    """A kept ``planted_clusters.csv`` has every column the tables read (older code wrote fewer)."""
    return {key for _, key in CLUSTER_COLUMNS} <= set(kept.columns)


def _with_rescored_fresh(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with the fresh-document loss of the runs that scored another sample than the current one
    re-scored from their final checkpoint (``experiments.planted_fresh``; computed once, kept in ``derived/``
    and the record; a kept score of another sample is computed again where the checkpoints are, else unused)."""
    redo = rows[RESCORE] == 1.0 if len(rows) else pd.Series(dtype=bool)
    if not redo.any():
        return rows
    from dograph.eval.planted import FRESH_SAMPLE  # torch: only when needed
    from experiments.planted_fresh import FRESH_FILE, fresh_from_checkpoint
    from experiments.run_files import checkpoint_points

    def current(kept: pd.DataFrame) -> bool:
        return "sample" in kept and len(kept) > 0 and kept["sample"].iloc[-1] == FRESH_SAMPLE

    rows = rows.copy()
    for at in rows.index[redo]:
        record = rows.at[at, "record"] if "record" in rows else None
        points = checkpoint_points(Path(rows.at[at, "run_dir"]), Path(record) if isinstance(record, str) else None,
                                   FRESH_FILE, fresh_from_checkpoint, current=current)
        if points is not None and current(points):
            rows.at[at, FRESH] = float(points["loss"].iloc[-1])
    return rows


def _with_last_checkpoint(rows: pd.DataFrame, clusters: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``clusters/<key>`` of each run's last kept checkpoint (NaN for runs without)."""
    rows = rows.copy()
    keys = [key for _, key in CLUSTER_COLUMNS]
    last = clusters.sort_values("step").groupby("seed").tail(1).set_index("seed") if not clusters.empty else None
    for key in keys:
        rows[f"clusters/{key}"] = [float(last.loc[int(s), key]) if last is not None and m == "dograph"
                                   and int(s) in last.index and key in last.columns else float("nan")
                                   for m, s in zip(rows["method"], rows["seed"], strict=True)]
    return rows


def _explain_cluster_cells(cells: list[list[str]], methods: list[str], count: int) -> None:
    """The cluster cells of the methods without clusters say why (the first) and "—" (the rest), in place: never
    a number, never hidden."""
    for row, method in zip(cells, methods, strict=True):
        if method != "dograph":
            row[-count:] = [NO_CLUSTERS.get(method, LABEL_BLIND)] + ["—"] * (count - 1)


def _agreement_panel(ax: Any, clusters: pd.DataFrame, domain: str) -> None:
    for key, label, style in (("ari_split", f"ARI within {domain} (hidden halves)", "o-"),
                              ("ari_hidden", "ARI vs hidden labels", "s--"), ("ari_given", "ARI vs given labels", "^:"),
                              ("nmi_split", f"NMI within {domain}", "D-."),
                              ("homogeneity_split", f"homogeneity within {domain}", "v-"),
                              ("homogeneity_chance", "its chance level (halves shuffled)", "x:")):
        steps = sorted(clusters["step"].unique())
        estimates = [mean_ci(clusters.loc[clusters["step"] == s, key]) for s in steps]
        ax.errorbar(steps, [e.mean for e in estimates], yerr=[0 if e.n < 2 else e.half_width for e in estimates],
                    fmt=style, capsize=3, label=label)
    ax.set_xlabel("step (kept checkpoint)")
    ax.set_ylabel("agreement (mean ± 95% CI over seeds)")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"(b) DoGraph's clusters vs the labels ({clusters['seed'].nunique()} seeds)", fontsize=9)
    ax.legend(fontsize=7)
