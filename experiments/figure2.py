"""Paper Figure 2: validation loss against model size, one line per method (mean and 95% CI over seeds)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.artifact import NothingToPlot
from experiments.common import method_name
from experiments.render import save_figure
from experiments.scale import RunRequest, Scale, make_request, rows_for
from experiments.stats import mean_ci
from experiments.table8 import parameter_count

NAME = "figure2"
TITLE = "Figure 2: validation loss against model size per method"
SETTING = "slimpajama_medium"  # the dataset of the scale's model-size sweep


def requests(scale: Scale) -> list[RunRequest]:
    dataset = scale.setting(SETTING)["dataset"]
    return [make_request(scale, method, model, dataset, seed, sweep="model_scale")
            for model in scale.model_scale for method in scale.methods for seed in scale.seeds]


def points(index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
    """One row per (method, model) with runs: parameters, mean loss, CI half-width, seeds."""
    out = []
    for method in scale.methods:
        for model in scale.model_scale:
            runs = rows_for(index, [r for r in requests(scale) if r.method == method and r.model == model])
            if runs.empty:
                continue
            est = mean_ci(runs["val/avg_loss"])
            out.append({"method": method, "model": model, "parameters": parameter_count(model), "loss": est.mean,
                        "ci": est.half_width, "seeds": est.n})
    return pd.DataFrame(out)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    data = points(index, scale)
    if data.empty:
        raise NothingToPlot(f"{NAME}: no run of the model-size sweep exists")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, group in data.groupby("method", sort=False):
        group = group.sort_values("parameters")
        ax.errorbar(group["parameters"], group["loss"], yerr=group["ci"].fillna(0), marker="o", capsize=3,
                    label=method_name(str(method)))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation loss (natural-mixture average, nats)")
    ax.set_title(f"{TITLE.split(': ')[1]} (scale {scale.name})", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, NAME, {"points": data})
