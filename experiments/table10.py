"""Paper Table 10: DoGraph's objective variants: the measured solve time per step and the validation loss."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.render import NOT_AVAILABLE, Table
from experiments.scale import RunRequest, Scale, make_request, rows_for
from experiments.tables import CI_NOTE, Column, estimate, metric, missing_note, ppl_of, scale_title

NAME = "table10"
TITLE = "Table 10: DoGraph's objectives: solve time per step and validation loss"
SETTING = "ablation"
# The paper's own numbers (their Appendix A.6, Table 10: "PPL", which reads as mean token loss): shown
# beside ours, labelled as theirs, never mixed into our cells.
PAPER_PPL = {"variance": 3.24, "robust": 3.31, "alignment": 3.15, "uncertainty": 3.09}
COLUMNS = (Column("Solve time (ms/step)", metric("mean_time_solve_s", 1000.0), 2),
           Column("Avg loss", metric("val/avg_loss"), 3), Column("Avg PPL", ppl_of("val/avg_loss"), 2),
           Column("Mean ESS", metric("mean_ess"), 3))


def requests(scale: Scale) -> list[RunRequest]:
    where = scale.setting(SETTING)
    return [make_request(scale, "dograph", where["model"], where["dataset"], seed, objective=objective,
                         sweep="objectives")
            for objective in scale.objectives for seed in scale.seeds]


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    rows = []
    for objective in scale.objectives:
        runs = rows_for(index, [r for r in requests(scale) if r.objective == objective])
        cells = [estimate(runs, c).format(c.digits) for c in COLUMNS] if not runs.empty else \
            [NOT_AVAILABLE] * len(COLUMNS)
        rows.append([objective, *cells, f"{PAPER_PPL[objective]:.2f}" if objective in PAPER_PPL else "-"])
    notes = [CI_NOTE, "The last column is the paper's (their Table 10), not measured here.",
             "Solve time: mixer/time_solve_s (the simplex problem, CVXPY) averaged over the logged steps.",
             *missing_note(index, requests(scale))]
    title = scale_title(TITLE, scale, SETTING)
    header = ["Objective", *(c.header for c in COLUMNS), "Paper's PPL (GPT-2, SlimPajama)"]
    return Table(NAME, title, header, rows, notes).write(out_dir)
