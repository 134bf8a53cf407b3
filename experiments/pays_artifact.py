"""The artifacts of "when does DoGraph's reweighting pays" (issue 19; the entries are in ``experiments.pays``).

Each compares *arms* (a method with, for DoGraph, m and a named variant of overrides) seed by seed
against a reference arm (Uniform at the same batch size), from the study's design in
``conf/reproduce/pays.yaml`` (``study``):

* :class:`EssCost` (question 1): DoGraph's loss penalty against Uniform and the mean effective sample
  size (ESS) of its weights, at three batch sizes and three m over the same training sequences;
* :class:`Variants` (question 3): the paper's update and our variants of the sample weights
  (``mixer.sample_weights``, docs/design.md 2.5) on the embedded corpus and the planted scenarios;
* :class:`Longer` (question 5): Uniform against one DoGraph update for 4x the steps, on other seeds.

A cell is the mean ± the 95% t-interval over seeds; a Δ is paired (per seed, minus the reference at
the same seed). Runs the cpu and planted scales made with the same overrides are read from their
records (``reads``), not retrained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dograph.errors import ConfigError
from experiments.render import NOT_AVAILABLE, Table, save_figure
from experiments.scale import DEFAULT_M, RunRequest, Scale, make_request, rows_for
from experiments.stats import mean_ci
from experiments.tables import CI_NOTE, missing_note

PAIRED = ("Δ vs Uniform: per seed, DoGraph's value minus Uniform's at the same seed (and batch size), mean ± the "
          "95% t-interval over the seeds both have: below 0, DoGraph is better; an interval that excludes 0 is "
          "resolved.")
ESS_NOTE = ("Mean ESS: the effective sample size of the step's sample weights, (sum v)^2 / (B sum v^2) in [1/B, 1], "
            "averaged over the steps a mixer weighed (summary.json weights.mean_ess; Uniform: 1).")
UPDATE_NAMES = {None: "paper (cluster_mean)"}
SEEDS_NOTE = ("Val loss cells are over each row's own seeds and Δ over the seeds both rows have, so while a seed "
              "is missing Δ need not equal the difference of the two cells.")


@dataclass(frozen=True)
class Arm:
    """One configuration a table compares: a method, for DoGraph its m, and a named variant of overrides."""

    method: str
    variant: str | None = None
    options: tuple[str, ...] = ()
    m: int = DEFAULT_M

    def requests(self, scale: Scale, setting: str, seeds: Sequence[int], scenario: str | None = None
                 ) -> list[RunRequest]:
        where = scale.setting(setting)
        return [make_request(scale, self.method, where["model"], where["dataset"], seed, m=self.m,
                             scenario=scenario, variant=self.variant, options=self.options, sweep="pays")
                for seed in seeds]


def per_seed(rows: pd.DataFrame, value: Callable[[pd.Series], float | None]) -> dict[int, float]:
    """``{seed: value}`` of the runs in ``rows`` (a run without the value is left out)."""
    out = {}
    for _, row in rows.iterrows():
        v = value(row)
        if v is not None and pd.notna(v):
            out[int(row["seed"])] = float(v)
    return out


def column(name: str) -> Callable[[pd.Series], float | None]:
    return lambda row: row.get(name)


def cell(values: dict[int, float], digits: int = 3) -> str:
    return mean_ci(values.values()).format(digits) if values else NOT_AVAILABLE


def paired(values: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    return {s: v - reference[s] for s, v in values.items() if s in reference}


def _batch_arms(scale: Scale, batch: str, m: int) -> tuple[Arm, Arm]:
    """DoGraph (m) and Uniform at one batch setting; the batch without overrides is the scale's own run size."""
    options = tuple(scale.study["batches"][batch])
    variant = batch if options else None
    return Arm("dograph", variant, options, m), Arm("uniform", variant, options)


def _batch_label(scale: Scale, batch: str) -> str:
    sizes = [o.split("=", 1)[1] for o in scale.study["batches"][batch] if o.startswith("trainer.batch_size=")]
    steps = [o.split("=", 1)[1] for o in scale.study["batches"][batch] if o.startswith("trainer.max_steps=")]
    common_steps = [o.split("=", 1)[1] for o in scale.common if o.startswith("trainer.max_steps=")]
    return f"batch {sizes[0] if sizes else 16} x {(steps or common_steps or ['?'])[0]} steps"


def ess_cells(scale: Scale) -> list[tuple[str, int, Arm, Arm]]:
    """The (batch, m) cells of question 1 with DoGraph's and Uniform's arms (``study.ess_cost``)."""
    return [(batch, int(m), *_batch_arms(scale, batch, int(m))) for batch, m in scale.study["ess_cost"]]


@dataclass(frozen=True)
class EssCost:
    """Question 1: DoGraph's loss penalty against Uniform against the mean ESS of its weights."""

    name: str
    title: str
    setting: str = "embedded"

    def cells(self, scale: Scale) -> list[tuple[str, int, Arm, Arm]]:
        return ess_cells(scale)

    def requests(self, scale: Scale) -> list[RunRequest]:
        out: list[RunRequest] = []
        for _, _, dograph, uniform in self.cells(scale):
            out += [r for arm in (dograph, uniform) for r in arm.requests(scale, self.setting, scale.seeds)
                    if r not in out]
        return out

    def points(self, index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
        """One row per (cell, seed) with DoGraph's and Uniform's loss, the paired Δ and DoGraph's mean ESS."""
        records = []
        for batch, m, dograph, uniform in self.cells(scale):
            ours = rows_for(index, dograph.requests(scale, self.setting, scale.seeds))
            ref = per_seed(rows_for(index, uniform.requests(scale, self.setting, scale.seeds)), column("val/avg_loss"))
            loss, ess = per_seed(ours, column("val/avg_loss")), per_seed(ours, column("mean_ess"))
            for seed in sorted(loss):
                records.append({"batch": batch, "label": _batch_label(scale, batch), "m": m, "seed": seed,
                                "dograph_loss": loss[seed], "uniform_loss": ref.get(seed), "mean_ess": ess.get(seed),
                                "delta": loss[seed] - ref[seed] if seed in ref else None})
        return pd.DataFrame(records, columns=["batch", "label", "m", "seed", "dograph_loss", "uniform_loss",
                                              "mean_ess", "delta"])

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        points = self.points(index, scale)
        rows = []
        for batch, m, _, _ in self.cells(scale):
            mine = points[(points["batch"] == batch) & (points["m"] == m)]
            values = {key: dict(zip(mine["seed"], mine[key], strict=True)) for key in
                      ("mean_ess", "dograph_loss", "uniform_loss", "delta")}
            values = {k: {s: v for s, v in d.items() if v is not None and pd.notna(v)} for k, d in values.items()}
            rows.append([_batch_label(scale, batch), str(m), cell(values["mean_ess"]), cell(values["dograph_loss"]),
                         cell(values["uniform_loss"]), cell(values["delta"])])
        notes = [CI_NOTE, "Every cell trains on the same sequences in the same order (the cpu scale's 400 steps x "
                 "16; 133 x 48 = 0.25% fewer), but a larger batch is also fewer optimizer updates at the same peak "
                 "learning rate (400, 133, 50), DoGraph's per-step statistics (EMA, proximal term) then span more "
                 "sequences, and its weights act on fewer steps; the warm-up covers 320, 336 or 384 sequences. "
                 "So the ESS moves together with these: Uniform at the same batch and seed is the pair that "
                 "removes their main effect, not their interaction with DoGraph's weights.",
                 "Val loss: the final validation loss averaged with the natural mixture (nats).", PAIRED, ESS_NOTE,
                 *missing_note(index, self.requests(scale))]
        table = Table(self.name, f"{self.title} - scale {scale.name}", ["Batch", "m", "DoGraph mean ESS",
                      "DoGraph val loss", "Uniform val loss", "Δ vs Uniform"], rows, notes)
        paths = table.write(out_dir)
        if points["delta"].notna().any():
            paths += save_figure(self.draw(points, scale), out_dir, self.name, {"points": points})
        return paths

    def draw(self, points: pd.DataFrame, scale: Scale) -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        done = points.dropna(subset=["delta", "mean_ess"])
        for (label, m), group in done.groupby(["label", "m"], sort=False):
            ess, delta = mean_ci(group["mean_ess"]), mean_ci(group["delta"])
            line = ax.errorbar([ess.mean], [delta.mean], xerr=[0 if ess.n < 2 else ess.half_width],
                               yerr=[0 if delta.n < 2 else delta.half_width], fmt="o", capsize=3,
                               label=f"{label}, m={m} (n={delta.n})")
            ax.scatter(group["mean_ess"], group["delta"], s=10, alpha=0.35, color=line[0].get_color())
        ax.axhline(0.0, color="gray", linestyle="--", zorder=1)
        ax.set_xlabel("DoGraph's mean ESS of the sample weights")
        ax.set_ylabel("Δ val loss vs Uniform (nats; paired by seed)")
        ax.set_title(f"{self.title} (scale {scale.name}; dots: seeds, bars: 95% CI)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


# (header, column, rule, shrink) of the rules EssRules compares; "equal": the paper's update with equal weights
RULES = (("ESS paper (cluster_mean)", "cluster_mean", "cluster_mean", 0.0),
         ("ESS equal cluster weights", "equal", "equal", 0.0), ("ESS tilt", "tilt", "tilt", 0.0),
         ("ESS shrink50", "shrink50", "shrink", 0.5))
RULE_COLUMNS = ["batch", "label", "m", "seed", "steps", "present", "singletons", *(r[1] for r in RULES), "logged"]


def step_ess(weights: np.ndarray, counts: np.ndarray, rule: str, shrink: float = 0.0) -> float:
    """The ESS ``(sum v)^2 / (B sum v^2)`` of one step's sample weights under ``rule``, at the cluster weights
    and batch counts DoGraph logged for it (``mixer/weights.csv``); ``equal``: the paper's update with equal
    weights on the present clusters (what the cluster counts alone cost). Computed by the training code's own
    ``per_sample_weights``."""
    import torch

    from dograph.method.mixer import per_sample_weights

    assign = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts, dtype=torch.int64))
    w = torch.as_tensor(np.ones_like(weights) if rule == "equal" else weights, dtype=torch.float64)
    v = per_sample_weights(w, assign, len(counts), "cluster_mean" if rule == "equal" else rule, shrink)
    return float(v.sum() ** 2 / (len(v) * (v ** 2).sum()))


def rule_points(run_dir: Path) -> dict[str, float] | None:
    """Per run: the mean over its weighed steps of each rule's ESS (:data:`RULES`), present clusters and singleton
    clusters per step; None without a weight history. A step whose weights gave the present clusters no usable
    mass trained on the plain mean (``present_mass_is_usable``) and is left out, as the logged mean ESS leaves
    it out."""
    from dograph.method.mixer import present_mass_is_usable

    path = run_dir / "mixer" / "weights.csv"
    if not path.exists():
        return None
    history = pd.read_csv(path)
    m = sum(1 for c in history.columns if c.startswith("w") and c[1:].isdigit())
    weights = history[[f"w{k}" for k in range(m)]].to_numpy(np.float64)
    counts = history[[f"n{k}" for k in range(m)]].to_numpy(np.int64)
    weighed = np.array([present_mass_is_usable(w, n) for w, n in zip(weights, counts, strict=True)], dtype=bool)
    weights, counts = weights[weighed], counts[weighed]
    if not len(weights):
        return None  # no weighed step (the run never left its warm-up)
    out = {"steps": float(len(history)), "present": float((counts > 0).sum(1).mean()),
           "singletons": float((counts == 1).sum(1).mean())}
    for _, key, rule, shrink in RULES:
        out[key] = float(np.mean([step_ess(w, n, rule, shrink) for w, n in zip(weights, counts, strict=True)]))
    return out


@dataclass(frozen=True)
class EssRules:
    """Question 1, from the runs already made: what the paper's update's ESS is made of, and what our rules
    would have given at the same cluster weights and counts (a counterfactual at the paper's run's weights: a run
    under another rule would choose other weights, so its own ESS is what pays_variants reports)."""

    name: str
    title: str
    setting: str = "embedded"

    def requests(self, scale: Scale) -> list[RunRequest]:
        return [r for _, _, dograph, _ in ess_cells(scale)
                for r in dograph.requests(scale, self.setting, scale.seeds)]

    def points(self, index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
        records = []
        for batch, m, dograph, _ in ess_cells(scale):
            found = rows_for(index, dograph.requests(scale, self.setting, scale.seeds))
            for _, row in found.iterrows():
                values = rule_points(Path(row["run_dir"]))
                if values is not None:
                    records.append({"batch": batch, "label": _batch_label(scale, batch), "m": m,
                                    "seed": int(row["seed"]), **values, "logged": row.get("mean_ess")})
        return pd.DataFrame(records, columns=RULE_COLUMNS)

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        points = self.points(index, scale)
        keys = [r[1] for r in RULES]
        rows = []
        for batch, m, _, _ in ess_cells(scale):
            mine = points[(points["batch"] == batch) & (points["m"] == m)]
            by_seed = {key: dict(zip(mine["seed"], mine[key], strict=True)) for key in ("present", "singletons", *keys)}
            rows.append([_batch_label(scale, batch), str(m), cell(by_seed["present"], 1),
                         cell(by_seed["singletons"], 1), *(cell(by_seed[k], 2) for k in keys)])
        notes = [CI_NOTE,
                 "Each run's logged cluster weights w and batch counts n of every weighed step (mixer/weights.csv) "
                 "turned into sample weights by the training code's per_sample_weights under each rule; ESS = "
                 "(sum v)^2 / (B sum v^2), averaged over the steps. The paper column recomputes the run's own "
                 "logged mean ESS (summary.json; equal to it to rounding, checked per run).",
                 "Equal cluster weights: the paper's update with w equal on the present clusters, so v_i = "
                 "1 / (K n_c): what the cluster counts alone cost, whatever the objective chose. Tilt and shrink50 "
                 "(docs/design.md 2.5) at the same w: what the rule alone changes. A counterfactual: a run under "
                 "another rule would reach other weights; its own ESS is in pays_variants.",
                 "Present: clusters with a sample in the step's batch; singletons: of them, those with one.",
                 *missing_note(index, self.requests(scale))]
        mismatch = points[(points["logged"] - points["cluster_mean"]).abs() > 1e-6]
        if len(mismatch):
            notes.append("Runs whose recomputed paper ESS differs from their logged one by more than 1e-6 (their "
                         "weight history does not match their summary): " + ", ".join(
                             f"{label} seed {seed}" for label, seed in zip(mismatch["label"], mismatch["seed"],
                                                                            strict=True)))
        header = ["Batch", "m", "Present clusters", "Singletons", *(r[0] for r in RULES)]
        return Table(self.name, f"{self.title} - scale {scale.name}", header, rows, notes).write(out_dir)


def _update_arms(scale: Scale) -> list[tuple[str, Arm]]:
    """Uniform, the paper's update, and each variant of ``study.sample_weights``."""
    arms = [("Uniform", Arm("uniform")), (f"DoGraph, {UPDATE_NAMES[None]}", Arm("dograph"))]
    return arms + [(f"DoGraph, {name}", Arm("dograph", name, tuple(options)))
                   for name, options in scale.study["sample_weights"].items()]


@dataclass(frozen=True)
class Variants:
    """Question 3: each update against Uniform on the embedded corpus and on every planted scenario."""

    name: str
    title: str

    def places(self, scale: Scale) -> list[tuple[str, str | None]]:
        return [("embedded", None), *(("planted", s) for s in scale.scenarios)]

    def requests(self, scale: Scale) -> list[RunRequest]:
        return [r for setting, scenario in self.places(scale) for _, arm in _update_arms(scale)
                for r in arm.requests(scale, setting, scale.seeds, scenario)]

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        from experiments.planted_measures import CLEAN, RATIO, measured_rows

        rows = []
        for setting, scenario in self.places(scale):
            measured, split = {}, {}
            for label, arm in _update_arms(scale):
                requests = arm.requests(scale, setting, scale.seeds, scenario)
                if scenario is None:
                    found = rows_for(index, requests)
                    measured[label] = (per_seed(found, column("val/avg_loss")), {}, per_seed(found, column("mean_ess")))
                else:
                    found = measured_rows(index, requests, leave_out_planted=scenario != "hidden_split")
                    measured[label] = (per_seed(found, column(CLEAN)), per_seed(found, column(RATIO)),
                                       per_seed(found, column("mean_ess")))
                if scenario == "hidden_split" and arm.method == "dograph":
                    split[label] = _split_agreement(found)
            reference = measured["Uniform"][0]
            for label, (loss, ratio, ess) in measured.items():
                delta = cell(paired(loss, reference)) if label != "Uniform" else "—"
                rows.append([scenario or setting, label, cell(loss), delta,
                             cell(ratio, 2) if scenario is not None and scenario != "hidden_split" else "—",
                             cell(ess, 2), cell(split[label], 2) if label in split else "—"])
        notes = [CI_NOTE, "Val loss: on the embedded corpus the natural-mixture average; on a planted corpus the "
                 "clean validation loss of the planted study (noise, duplicates: every domain but the planted one; "
                 "hidden_split: every domain), results/planted/.", PAIRED, SEEDS_NOTE,
                 "Planted ÷ share: the planted domain's effective weight over training ÷ its natural share "
                 "(below 1: down-weighted; the planted study's measure).", ESS_NOTE,
                 "ARI split (hidden_split, DoGraph): at the last kept checkpoint, the ARI of DoGraph's own clusters "
                 "within the merged domain against its two hidden halves (the planted study's measure, computed "
                 "once from the checkpoints and kept in derived/; 0 at chance, 1 only when each half is one "
                 "cluster of its own: results/planted/planted_hidden_split.md gives homogeneity beside it).",
                 "Updates (docs/design.md 2.5): paper = v_i = w_c / (n_c sum w), the default; tilt = v_i ∝ w_c; "
                 "shrink50 = half the plain mean, half the paper's. The paper's update and Uniform are the cpu and "
                 "planted scales' own runs.", *missing_note(index, self.requests(scale))]
        return Table(self.name, f"{self.title} - scale {scale.name}: gpt2_tiny",
                     ["Corpus", "Update", "Val loss", "Δ vs Uniform", "Planted ÷ share", "Mean ESS", "ARI split"], rows,
                     notes).write(out_dir)


def _split_agreement(found: pd.DataFrame) -> dict[int, float]:
    """``{seed: ari_split}`` of DoGraph's clusters at each run's last kept checkpoint (``planted_clusters``)."""
    from experiments.planted_artifact import CLUSTERS_FILE, has_cluster_columns
    from experiments.planted_clusters import cluster_agreement
    from experiments.run_files import checkpoint_points

    out = {}
    for _, row in found.iterrows():
        record = row.get("record")
        points = checkpoint_points(Path(row["run_dir"]), Path(record) if isinstance(record, str) else None,
                                   CLUSTERS_FILE, cluster_agreement, current=has_cluster_columns)
        if points is not None and not points.empty:
            out[int(row["seed"])] = float(points.sort_values("step")["ari_split"].iloc[-1])
    return out


def longer_updates(scale: Scale) -> list[tuple[str, Arm]]:
    """The updates question 5 may train: ``paper`` (the default update) and each ``study.sample_weights`` variant."""
    return [("paper", Arm("dograph")), *((name, Arm("dograph", name, tuple(options)))
                                          for name, options in scale.study["sample_weights"].items())]


def rule_choice(index: pd.DataFrame, scale: Scale, setting: str = "embedded"
                ) -> tuple[str | None, dict[str, float]]:
    """The update the rule fixed in conf/reproduce/pays.yaml picks for question 5, and each update's mean Δ.

    The rule: the update with the lowest mean paired Δ vs Uniform (final natural-mixture validation loss)
    on the embedded corpus, over all of the scale's seeds (ties: the first of :func:`longer_updates`, the
    paper's first). ``None`` until every update has a finite loss at every seed: no choice on part of them.
    """
    seeds = set(scale.seeds)
    reference = per_seed(rows_for(index, Arm("uniform").requests(scale, setting, scale.seeds)), column("val/avg_loss"))
    means: dict[str, float] = {}
    for name, arm in longer_updates(scale):
        deltas = paired(per_seed(rows_for(index, arm.requests(scale, setting, scale.seeds)), column("val/avg_loss")),
                        reference)
        if set(deltas) != seeds:
            return None, means
        means[name] = sum(deltas.values()) / len(deltas)
    return min(means, key=lambda name: means[name]), means


@dataclass(frozen=True)
class Longer:
    """Question 5: Uniform against one DoGraph update for 4x the steps (``study.longer``), on seeds of its own."""

    name: str
    title: str
    setting: str = "embedded"

    def arms(self, scale: Scale) -> list[tuple[str, Arm]]:
        spec = scale.study["longer"]
        update = spec.get("update")
        if update is None:
            return []
        names = [name for name, _ in longer_updates(scale)]
        if update not in names:
            raise ConfigError(f"study.longer.update in conf/reproduce/{scale.name}.yaml must be null or one of "
                              f"{', '.join(names)} (got {update!r})")
        base = tuple(spec["overrides"])
        variant_options = () if update == "paper" else tuple(scale.study["sample_weights"][update])
        return [("Uniform", Arm("uniform", "longer", base)),
                (f"DoGraph, {UPDATE_NAMES[None] if update == 'paper' else update}",
                 Arm("dograph", f"longer_{update}", base + variant_options))]

    def requests(self, scale: Scale) -> list[RunRequest]:
        seeds = scale.study["longer"]["seeds"]
        return [r for _, arm in self.arms(scale) for r in arm.requests(scale, self.setting, seeds)]

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        spec = scale.study["longer"]
        rule = ("The update is chosen after question 3 by the rule fixed in conf/reproduce/pays.yaml before any "
                "variant was measured: the one with the lowest mean paired Δ vs Uniform on the embedded corpus; "
                f"seeds {spec['seeds']} (not the other questions'); overrides: {', '.join(spec['overrides'])}.")
        chosen, means = rule_choice(index, scale, self.setting)
        if chosen is None:
            gives = "the rule cannot be applied yet: not every update has all seeds on the embedded corpus"
        else:
            gives = (f"the rule gives {chosen} (mean Δ vs Uniform: "
                     + ", ".join(f"{name} {value:+.3f}" for name, value in means.items()) + ")")
        arms = self.arms(scale)
        if not arms:
            return Table(self.name, f"{self.title} - scale {scale.name}", ["Method", "Val loss", "Δ vs Uniform",
                         "Mean ESS"], [], [f"Not run yet: study.longer.update is null; {gives}. {rule}"]).write(out_dir)
        check = ([] if chosen == spec["update"] else
                 [f"WARNING: study.longer.update is {spec['update']}, but {gives}: these runs do not follow the rule."])
        measured = {label: rows_for(index, arm.requests(scale, self.setting, spec["seeds"])) for label, arm in arms}
        reference = per_seed(measured["Uniform"], column("val/avg_loss"))
        rows = []
        for label, found in measured.items():
            loss = per_seed(found, column("val/avg_loss"))
            rows.append([label, cell(loss), "—" if label == "Uniform" else cell(paired(loss, reference)),
                         cell(per_seed(found, column("mean_ess")), 2)])
        notes = [CI_NOTE, rule, *check, PAIRED, SEEDS_NOTE, ESS_NOTE, *missing_note(index, self.requests(scale))]
        return Table(self.name, f"{self.title} - scale {scale.name}", ["Method", "Val loss", "Δ vs Uniform",
                     "Mean ESS"], rows, notes).write(out_dir)


@dataclass(frozen=True)
class Isolation:
    """Question 4: whether K-means on DoGraph's projected gradients can isolate the planted noise domain, over
    ``cluster_on``, the projection rank, m and the buffer size (``experiments.cluster_isolation``), on the
    planted study's DoGraph runs of the noise scenario, at each checkpoint they kept."""

    name: str
    title: str
    scenario: str = "noise"

    def requests(self, scale: Scale) -> list[RunRequest]:
        return Arm("dograph").requests(scale, "planted", scale.seeds, self.scenario)

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        from experiments.cluster_isolation import CLUSTER_ON, NAME, PURITY

        points, unmeasured = self.points(index, scale)
        rows: list[list[str]] = []
        notes = [f"Cells: isolated / ARI, each the mean over the seeds (n below). isolated: the share of the planted "
                 f"domain's held-out windows that lie in clusters at least {PURITY:.0%} planted; ARI: adjusted Rand "
                 "index of the clusters against planted-or-not. K-means (the project's, 3 restarts x 3 iterations) "
                 "on the first N of one shuffled pool of held-out windows in natural proportions, projected at rank r "
                 "with the run's projection otherwise (experiments/cluster_isolation.py).",
                 "The clusters are fitted here on the runs' checkpoints, not DoGraph's own during training (those "
                 "are in each run's mixer/refreshes.jsonl): the question is whether any setting could let DoGraph "
                 "separate the noise domain at all."]
        header = ["Step", "cluster_on", "Rank (dim)"]
        if not points.empty:
            columns = [(m, n) for m in sorted(points["m"].unique()) for n in sorted(points["buffer_size"].unique())]
            header += [f"m={m} N={n}" for m, n in columns]
            grouped = points.groupby(["step", "cluster_on", "rank", "dim", "m", "buffer_size"])
            means = grouped[["isolated", "ari"]].mean()
            order = {on: i for i, on in enumerate(CLUSTER_ON)}
            keys = points[["step", "cluster_on", "rank", "dim"]].drop_duplicates()
            keys = keys.sort_values(["step", "cluster_on", "rank"],
                                    key=lambda c: c.map(order) if c.name == "cluster_on" else c)
            for step, on, rank, dim in keys.itertuples(index=False):
                rows.append([str(step), on, f"{rank} ({dim})",
                             *(f"{means.loc[(step, on, rank, dim, m, n), 'isolated']:.2f} / "
                               f"{means.loc[(step, on, rank, dim, m, n), 'ari']:.2f}" for m, n in columns)])
            notes.append(f"Seeds: {sorted(int(s) for s in points['seed'].unique())} (n = "
                         f"{points['seed'].nunique()}); per-seed rows in {self.name}_points.csv ({NAME}).")
        notes += unmeasured
        notes += missing_note(index, self.requests(scale))
        paths = Table(self.name, f"{self.title} - scale {scale.name}: DoGraph on planted {self.scenario}", header,
                      rows, notes).write(out_dir)
        if not points.empty:
            path = out_dir / f"{self.name}_points.csv"
            points.to_csv(path, index=False)
            paths.append(path)
        return paths

    def points(self, index: pd.DataFrame, scale: Scale) -> tuple[pd.DataFrame, list[str]]:
        """Every run's rows (computed once from its checkpoints, kept in ``derived/``), with its seed; and a note
        for each run that could not be measured."""
        from experiments.cluster_isolation import NAME, isolation_rows
        from experiments.run_files import checkpoint_points, checkpoints_of

        frames, unmeasured = [], []
        for _, row in rows_for(index, self.requests(scale)).iterrows():
            run = Path(row["run_dir"])
            record = row.get("record")

            def compute(path: Path) -> pd.DataFrame | None:
                return isolation_rows(path) if checkpoints_of(path) else None

            found = checkpoint_points(run, Path(record) if isinstance(record, str) else None, NAME, compute)
            if found is None:
                unmeasured.append(f"seed {int(row['seed'])}: not measured (its record keeps no checkpoint and "
                                        f"no derived/{NAME}.csv; measure it where the run's checkpoints are)")
                continue
            frames.append(found.assign(seed=int(row["seed"])))
        return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), unmeasured
