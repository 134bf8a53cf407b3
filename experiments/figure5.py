"""Paper Figure 5: training time per method, its proxy, reference and sweep stages included (stacked bars).

Only training is compared: validation and checkpoint seconds differ between methods for reasons
that are not the method (DoGraph's checkpoint holds its buffer; proxies skip validation), so they
are drawn in a separate panel and never added to the bars on the left.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.artifact import NothingToPlot
from experiments.common import method_name
from experiments.render import save_figure
from experiments.scale import RunRequest, Scale, method_requests, rows_for
from experiments.stats import mean_ci

NAME = "figure5"
TITLE = "Figure 5: training time per method (main run + its earlier stages)"
SETTING = "slimpajama_medium"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def _mean(runs: pd.DataFrame, column: str) -> float:
    return mean_ci(runs[column]).mean if column in runs else float("nan")


def times(index: pd.DataFrame, scale: Scale) -> pd.DataFrame:
    """One row per method with runs: mean training seconds (main run, stages), their CI, and the other parts."""
    rows = []
    for method in scale.methods:
        runs = rows_for(index, [r for r in requests(scale) if r.method == method])
        if runs.empty:
            continue
        train = mean_ci(runs["train_time_s"])
        rows.append({"method": method, "train_s": train.mean, "stages_s": _mean(runs, "stage_time_s"),
                     "total_ci": mean_ci(runs["total_time_s"]).half_width, "seeds": train.n,
                     "eval_s": _mean(runs, "eval_time_s"), "ckpt_s": _mean(runs, "ckpt_time_s")})
    return pd.DataFrame(rows)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    data = times(index, scale)
    if data.empty:
        raise NothingToPlot(f"{NAME}: no run of the method comparison exists")
    fig, (ax, other) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    names = [method_name(m) for m in data["method"]]
    ax.bar(names, data["stages_s"].fillna(0), label="stages (reference, proxy, sweep)", color="tab:orange")
    ax.bar(names, data["train_s"], bottom=data["stages_s"].fillna(0), yerr=data["total_ci"].fillna(0), capsize=3,
           label="main run", color="tab:blue")
    ax.set_ylabel("training time (s; validation and checkpoints excluded)")
    ax.set_title(f"{TITLE.split(': ')[1]} (scale {scale.name})", fontsize=9)
    ax.legend(fontsize=8)
    other.bar(names, data["eval_s"].fillna(0), label="validation", color="tab:gray")
    other.bar(names, data["ckpt_s"].fillna(0), bottom=data["eval_s"].fillna(0), label="checkpoints",
              color="tab:olive")
    other.set_ylabel("seconds (main run)")
    other.set_title("not training, not compared: validation and checkpoints", fontsize=9)
    other.legend(fontsize=8)
    for axis in (ax, other):
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    return save_figure(fig, out_dir, NAME, {"times": data})
