"""Paper Figure 4: DoGraph's validation loss against the number of model-centric domains m."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.artifact import NothingToPlot
from experiments.render import save_figure
from experiments.scale import RunRequest, Scale, make_request, rows_for
from experiments.stats import mean_ci

NAME = "figure4"
TITLE = "Figure 4: validation loss against m (DoGraph), uniform for reference"
SETTING = "ablation"


def requests(scale: Scale) -> list[RunRequest]:
    where = scale.setting(SETTING)
    runs = [make_request(scale, "dograph", where["model"], where["dataset"], seed, m=m, sweep="m_sweep")
            for m in scale.m_values for seed in scale.seeds]
    return [*runs, *(make_request(scale, "uniform", where["model"], where["dataset"], seed) for seed in scale.seeds)]


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    rows = []
    for m in scale.m_values:
        runs = rows_for(index, [r for r in requests(scale) if r.method == "dograph" and r.m == m])
        if not runs.empty:
            est = mean_ci(runs["val/avg_loss"])
            rows.append({"m": m, "loss": est.mean, "ci": est.half_width, "seeds": est.n})
    data = pd.DataFrame(rows)
    if data.empty:
        raise NothingToPlot(f"{NAME}: no DoGraph run of the m sweep exists")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(data["m"], data["loss"], yerr=data["ci"].fillna(0), marker="o", capsize=3, label="DoGraph")
    uniform = rows_for(index, [r for r in requests(scale) if r.method == "uniform"])
    if not uniform.empty:
        est = mean_ci(uniform["val/avg_loss"])
        ax.axhline(est.mean, color="gray", linestyle="--", label=f"Uniform (n={est.n})")
    ax.set_xlabel("m (model-centric domains)")
    ax.set_ylabel("validation loss (natural-mixture average)")
    ax.set_title(f"{TITLE.split(': ')[1]} (scale {scale.name})", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, NAME, {"points": data})
