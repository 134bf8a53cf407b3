"""Write an artifact: a table as Markdown, LaTeX and CSV; a figure as PNG and PDF."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOT_AVAILABLE = "not available"


@dataclass
class Table:
    """A paper table: a header, rows of already formatted cells, and notes printed under it."""

    name: str  # file stem, e.g. table2
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        spec = "l" + "r" * (len(self.columns) - 1)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(self.title)}}}",
                 f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(_tex(c) for c in self.columns) + " \\\\",
                 "\\midrule", *(" & ".join(_tex(c) for c in row) + " \\\\" for row in self.rows),
                 "\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([self.columns, *self.rows])
        return out.getvalue()

    def write(self, out_dir: Path) -> list[Path]:
        """``<name>.md``, ``<name>.tex``, ``<name>.csv`` in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for suffix, text in ((".md", self.markdown()), (".tex", self.latex()), (".csv", self.csv())):
            path = out_dir / f"{self.name}{suffix}"
            path.write_text(text)
            paths.append(path)
        return paths


def _md(cell: Any) -> str:
    return str(cell).replace("|", "\\|")


def _tex(cell: Any) -> str:
    text = str(cell)
    for char, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        text = text.replace(char, escaped)
    return text.replace("±", "$\\pm$")


def save_figure(fig: Any, out_dir: Path, name: str, data: dict[str, Any] | None = None) -> list[Path]:
    """``<name>.png`` (150 dpi) and ``<name>.pdf``, and each plotted frame of ``data`` as ``<name>_<key>.csv``
    (so a notebook can redraw it); closes the figure.

    Both files carry no creation date, so the same points give the same bytes (committed results are
    rebuilt and compared byte for byte).
    """
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    plt.close(fig)
    for key, frame in (data or {}).items():
        paths.append(out_dir / f"{name}_{key}.csv")
        frame.to_csv(paths[-1], index=False)
    return paths
