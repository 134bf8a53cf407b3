"""The figures drawn from the results index alone (Figures 2, 4, 5); ``experiments.paper`` gives each its parameters.

Each plots a mean and its 95% Student-t interval over seeds per point and writes the plotted frame
beside the picture. With no run at all it raises :class:`NothingToPlot` (no empty figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.artifact import NothingToPlot
from experiments.render import save_figure
from experiments.scale import RunRequest, Scale, make_request, method_requests, rows_for
from experiments.stats import mean_ci
from experiments.tables import method_name


@dataclass(frozen=True)
class ModelSizeFigure:
    """Validation loss against model size, one line per method (Figure 2): the scale's ``model_scale`` sweep on the
    setting's dataset."""

    name: str
    title: str
    setting: str

    def requests(self, scale: Scale) -> list[RunRequest]:
        dataset = scale.setting(self.setting)["dataset"]
        return [make_request(scale, method, model, dataset, seed, sweep="model_scale")
                for model in scale.model_scale for method in scale.methods for seed in scale.seeds]

    def points(self, index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
        """One row per (method, model) with runs: parameters, mean loss, CI half-width, seeds."""
        from experiments.table8 import parameter_count  # builds the model on the meta device: imports torch

        out = []
        for method in scale.methods:
            for model in scale.model_scale:
                runs = rows_for(index, [r for r in self.requests(scale) if r.method == method and r.model == model])
                if runs.empty:
                    continue
                est = mean_ci(runs["val/avg_loss"])
                out.append({"method": method, "model": model, "parameters": parameter_count(model),
                            "loss": est.mean, "ci": est.half_width, "seeds": est.n})
        return pd.DataFrame(out)

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        data = self.points(index, scale)
        if data.empty:
            raise NothingToPlot(f"{self.name}: no run of the model-size sweep exists")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, group in data.groupby("method", sort=False):
            group = group.sort_values("parameters")
            ax.errorbar(group["parameters"], group["loss"], yerr=group["ci"].fillna(0), marker="o", capsize=3,
                        label=method_name(str(method)))
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation loss (natural-mixture average, nats)")
        ax.set_title(f"{self.title.split(': ')[1]} (scale {scale.name})", fontsize=9)
        ax.legend(fontsize=7)
        return save_figure(fig, out_dir, self.name, {"points": data})


@dataclass(frozen=True)
class MSweepFigure:
    """DoGraph's validation loss against the number of model-centric domains m, uniform for reference (Figure 4)."""

    name: str
    title: str
    setting: str

    def requests(self, scale: Scale) -> list[RunRequest]:
        where = scale.setting(self.setting)
        runs = [make_request(scale, "dograph", where["model"], where["dataset"], seed, m=m, sweep="m_sweep")
                for m in scale.m_values for seed in scale.seeds]
        return [*runs, *(make_request(scale, "uniform", where["model"], where["dataset"], seed)
                         for seed in scale.seeds)]

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        rows = []
        for m in scale.m_values:
            runs = rows_for(index, [r for r in self.requests(scale) if r.method == "dograph" and r.m == m])
            if not runs.empty:
                est = mean_ci(runs["val/avg_loss"])
                rows.append({"m": m, "loss": est.mean, "ci": est.half_width, "seeds": est.n})
        data = pd.DataFrame(rows)
        if data.empty:
            raise NothingToPlot(f"{self.name}: no DoGraph run of the m sweep exists")
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar(data["m"], data["loss"], yerr=data["ci"].fillna(0), marker="o", capsize=3, label="DoGraph")
        uniform = rows_for(index, [r for r in self.requests(scale) if r.method == "uniform"])
        if not uniform.empty:
            est = mean_ci(uniform["val/avg_loss"])
            ax.axhline(est.mean, color="gray", linestyle="--", label=f"Uniform (n={est.n})")
        ax.set_xlabel("m (model-centric domains)")
        ax.set_ylabel("validation loss (natural-mixture average)")
        ax.set_title(f"{self.title.split(': ')[1]} (scale {scale.name})", fontsize=9)
        ax.legend(fontsize=8)
        return save_figure(fig, out_dir, self.name, {"points": data})


def _mean(runs: pd.DataFrame, column: str) -> float:
    return mean_ci(runs[column]).mean if column in runs else float("nan")


@dataclass(frozen=True)
class TrainingTimeFigure:
    """Training time per method, its proxy, reference and sweep stages included, as stacked bars (Figure 5).

    Only training is compared: validation and checkpoint seconds differ between methods for reasons
    that are not the method (DoGraph's checkpoint holds its buffer; proxies skip validation), so they
    are drawn in a separate panel and never added to the bars on the left (docs/design.md section 1.4).
    """

    name: str
    title: str
    setting: str

    def requests(self, scale: Scale) -> list[RunRequest]:
        return method_requests(scale, self.setting)

    def times(self, index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
        """One row per method with runs: mean training seconds (main run, stages), their CI, and the other parts."""
        rows = []
        for method in scale.methods:
            runs = rows_for(index, [r for r in self.requests(scale) if r.method == method])
            if runs.empty:
                continue
            train = mean_ci(runs["train_time_s"])
            rows.append({"method": method, "train_s": train.mean, "stages_s": _mean(runs, "stage_time_s"),
                         "total_ci": mean_ci(runs["total_time_s"]).half_width, "seeds": train.n,
                         "eval_s": _mean(runs, "eval_time_s"), "ckpt_s": _mean(runs, "ckpt_time_s")})
        return pd.DataFrame(rows)

    def build(self, index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        data = self.times(index, scale)
        if data.empty:
            raise NothingToPlot(f"{self.name}: no run of the method comparison exists")
        fig, (ax, other) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
        names = [method_name(m) for m in data["method"]]
        ax.bar(names, data["stages_s"].fillna(0), label="stages (reference, proxy, sweep)", color="tab:orange")
        ax.bar(names, data["train_s"], bottom=data["stages_s"].fillna(0), yerr=data["total_ci"].fillna(0),
               capsize=3, label="main run", color="tab:blue")
        ax.set_ylabel("training time (s; validation and checkpoints excluded)")
        ax.set_title(f"{self.title.split(': ')[1]} (scale {scale.name})", fontsize=9)
        ax.legend(fontsize=8)
        other.bar(names, data["eval_s"].fillna(0), label="validation", color="tab:gray")
        other.bar(names, data["ckpt_s"].fillna(0), bottom=data["eval_s"].fillna(0), label="checkpoints",
                  color="tab:olive")
        other.set_ylabel("seconds (main run)")
        other.set_title("not training, not compared: validation and checkpoints", fontsize=9)
        other.legend(fontsize=8)
        for axis in (ax, other):
            axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        return save_figure(fig, out_dir, self.name, {"times": data})
