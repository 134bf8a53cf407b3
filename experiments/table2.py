"""Paper Table 2: validation loss per human domain and its natural-mixture average, per method.

The paper's "PPL" values (3.09 to 4.51) look like mean token loss (docs/design.md section 1), so
the domains are reported as loss in nats and the average both as loss and as exp(loss).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.common import (
    CI_NOTE,
    Column,
    method_rows,
    metric,
    missing_note,
    ppl_of,
    scale_title,
    shared_stage_note,
)
from experiments.index import domains_of
from experiments.render import Table
from experiments.scale import RunRequest, Scale, method_requests, rows_for

NAME = "table2"
TITLE = "Table 2: validation loss per domain (paper: GPT-2 Medium, SlimPajama-6B)"
SETTING = "slimpajama_medium"


def requests(scale: Scale) -> list[RunRequest]:
    return method_requests(scale, SETTING)


def build(index: pd.DataFrame, scale: Scale, out_dir: Path) -> list[Path]:
    runs = rows_for(index, requests(scale))
    domains = domains_of(runs.dropna(axis=1, how="all")) if not runs.empty else []
    columns = [Column(d, metric(f"val/{d}/loss"), 3) for d in domains]
    columns += [Column("Avg loss", metric("val/avg_loss"), 3), Column("Avg PPL", ppl_of("val/avg_loss"), 2),
                Column("Worst loss", metric("val/worst_loss"), 3)]
    notes = [CI_NOTE, "Loss: mean token cross-entropy in nats; Avg: weighted by the natural mixture; "
             "PPL = exp(Avg loss).", *shared_stage_note(scale.methods), *missing_note(index, requests(scale))]
    rows = method_rows(index, requests(scale), columns, scale.methods)
    title = scale_title(TITLE, scale, SETTING)
    return Table(NAME, title, ["Method", *(c.header for c in columns)], rows, notes).write(out_dir)
