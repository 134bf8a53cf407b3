"""Paper Figure 5: wall time per method, its proxy, reference and sweep stages included (stacked bars)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.artifact import NothingToPlot
from experiments.common import method_name
from experiments.render import save_figure
from experiments.scale import RunRequest, Scale, method_requests, rows_for
from experiments.stats import mean_ci

NAME = "figure5"
TITLE = "Figure 5: wall time per method (main run + its earlier stages)"
SETTING = "slimpajama_medium"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    rows = []
    for method in scale.methods:
        runs = rows_for(index, [r for r in requests(scale) if r.method == method])
        if runs.empty:
            continue
        train, stages = mean_ci(runs["train_time_s"]), mean_ci(runs["stage_time_s"])
        rows.append({"method": method, "train_s": train.mean, "stages_s": stages.mean,
                     "total_ci": mean_ci(runs["total_time_s"]).half_width, "seeds": train.n})
    data = pd.DataFrame(rows)
    if data.empty:
        raise NothingToPlot(f"{NAME}: no run of the method comparison exists")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [method_name(m) for m in data["method"]]
    ax.bar(names, data["stages_s"], label="stages (reference, proxy, sweep)", color="tab:orange")
    ax.bar(names, data["train_s"], bottom=data["stages_s"], yerr=data["total_ci"].fillna(0), capsize=3,
           label="main run", color="tab:blue")
    ax.set_ylabel("wall time (s, training loops)")
    ax.set_title(f"{TITLE.split(': ')[1]} (scale {scale.name})", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, NAME, {"times": data})
