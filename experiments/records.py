"""Run records: the compact copy of a completed run that is committed, so results outlive the machine.

A run directory holds checkpoints, an HF export and W&B files (hundreds of MB) and lives under the
git-ignored ``outputs/``. When a run of a scale completes, :func:`write_record` copies what the
results index reads into ``results/<scale>/runs/<run-id>/`` (committed for the cpu scale):

* ``run_info.json`` (resolved config, overrides and their fingerprint, commit, versions, machine),
  ``config.yaml`` (Hydra's resolved config), ``summary.json``, ``metrics.jsonl`` (train and eval
  records), ``eval/scores.json``, ``stages.json`` (the earlier stages and their costs), the
  mixer's own files under ``mixer/`` (per-step weights or mixture CSV, DoGraph's refreshes) and
  ``derived/`` (points Figures 1 and 3 computed from the checkpoints, ``experiments.run_files``);
* ``record.json``: the run's Hydra choices (method, model, dataset, objective), where it was made,
  when it completed, how long its process took (``launch.json`` of the scheduler) and the record's size.

No checkpoints, exports or W&B files: a record weighs tens of KiB. The index
(:mod:`experiments.index`) reads a record like a run directory. A record names its run by
identity and fingerprint (``<method>-<model>-<dataset>-<variant>-seed<k>-<fingerprint>``), so a
record made with other overrides sits beside the current one and is reported stale
(:func:`stale_records`) instead of being read.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from dograph.atomic import publish_directory
from experiments.index import DERIVED, RECORD_FILE, dataset_label, hydra_choices, in_flight, read_run
from experiments.scale import REPO, RunRequest, Scale, find_run, request_overrides, same_identity

RECORD_FORMAT = 1
COPIED = ("run_info.json", "summary.json", "metrics.jsonl", "eval/scores.json", "launch.json")
MIXER_SUFFIXES = (".csv", ".jsonl", ".json")
MAX_MIXER_FILE = 512 * 1024  # a mixer file above this is left out (and named in record.json)


def records_root(scale: Scale) -> Path:
    """``results/<scale>/runs``: where a scale's records live."""
    return scale.results_dir / "runs"


def portable(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (records are read on other machines)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def record_id(row: dict[str, Any]) -> str:
    """``<method>-<model>-<dataset>-<variant>-seed<k>-<fingerprint>`` of an index row (the dataset of a planted
    scenario: ``planted_<scenario>``)."""
    variant = f"m{row['m']}_{row['objective']}" if row["method"] == "dograph" else "default"
    variant += f"_{row['variant']}" if isinstance(row.get("variant"), str) else ""
    dataset = dataset_label(row["dataset"], row.get("scenario"))
    return f"{row['method']}-{row['model']}-{dataset}-{variant}-seed{row['seed']}-{row['fingerprint']}"


def _stages(run_dir: Path) -> list[dict[str, Any]] | None:
    path = run_dir / "stages.json"
    if not path.exists():
        return None
    stages = json.loads(path.read_text())
    return [{**s, "run_dir": portable(s["run_dir"])} if "run_dir" in s else s for s in stages]


def write_record(run_dir: Path, root: Path) -> Path:
    """Copy the complete run ``run_dir`` into ``root/<run-id>/`` (replacing an older record of the same id).

    The record is assembled in a temporary directory and renamed into place, so a reader never sees
    half of one.
    """
    row = read_run(run_dir)
    if row is None or row.get("status") != "complete":
        raise ValueError(f"{run_dir} is not a complete run: no record written")
    if not row.get("fingerprint"):
        raise ValueError(f"{run_dir} has no overrides fingerprint (made without Hydra): no record written")
    summary = json.loads((run_dir / "summary.json").read_text())
    target = root / record_id(row)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        for name in COPIED:
            if (run_dir / name).exists():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / name, tmp / name)
        if (run_dir / ".hydra" / "config.yaml").exists():
            shutil.copyfile(run_dir / ".hydra" / "config.yaml", tmp / "config.yaml")
        stages = _stages(run_dir)
        if stages is not None:
            (tmp / "stages.json").write_text(json.dumps(stages, indent=2) + "\n")
        for path in sorted((run_dir / DERIVED).glob("*.csv")) if (run_dir / DERIVED).is_dir() else []:
            (tmp / DERIVED).mkdir(exist_ok=True)
            shutil.copyfile(path, tmp / DERIVED / path.name)
        left_out = []
        for path in sorted((run_dir / "mixer").glob("*")) if (run_dir / "mixer").is_dir() else []:
            if path.suffix not in MIXER_SUFFIXES or not path.is_file():
                continue
            if path.stat().st_size > MAX_MIXER_FILE:
                left_out.append(path.name)
                continue
            (tmp / "mixer").mkdir(exist_ok=True)
            shutil.copyfile(path, tmp / "mixer" / path.name)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        meta = {"format": RECORD_FORMAT, "run_id": target.name, "source": portable(run_dir),
                "completed_at": summary.get("completed_at"), "choices": hydra_choices(run_dir),
                "mixer_files_left_out": left_out, "bytes": size}
        (tmp / RECORD_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        publish_directory(tmp, target, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def record_missing(index: pd.DataFrame, requests: list[RunRequest], root: Path, runs_root: Path | None = None
                   ) -> list[Path]:
    """Write a record for every request whose chosen run is a live directory without one (under ``runs_root``
    when given: another scale's runs are that scale's to record); returns the new ones."""
    written = []
    for request in requests:
        found = find_run(index, request)
        if found.empty:
            continue
        row = found.iloc[-1]
        inside = runs_root is None or Path(row["run_dir"]).resolve().is_relative_to(runs_root.resolve())
        if row.get("source") == "run" and not isinstance(row.get("record"), str) and inside \
                and not in_flight(Path(row["run_dir"])):  # a scheduler's run still finishing: its own to record
            written.append(write_record(Path(row["run_dir"]), root))
    return written


def stale_records(index: pd.DataFrame, requests: list[RunRequest], scale: Scale) -> list[tuple[str, str]]:
    """Records that no request reads any more, with why: (record directory, reason).

    A record of the scale's own is stale when a request has its identity (:func:`same_identity`)
    but another overrides fingerprint: the scale's ``common`` or ``method_overrides`` changed since
    it was made. The reason names the overrides that differ.
    """
    if index.empty or "source" not in index.columns:
        return []
    wanted = {r.fingerprint: r for r in requests}
    out = []
    own = records_root(scale).resolve()
    for _, row in index[index["source"] == "record"].iterrows():
        if row.get("fingerprint") in wanted or not Path(row["run_dir"]).resolve().is_relative_to(own):
            continue  # read, or another scale's record (that scale says whether it is stale)
        same = [r for r in requests if same_identity(row, r)]
        if not same:
            continue
        now = set(_canonical(request_overrides(same[0], scale)))
        then = set(row.get("overrides") or [])
        changed = sorted(then - now) + sorted(f"now {o}" for o in now - then)
        out.append((portable(row["run_dir"]), f"made with other overrides than the scale now gives {same[0].label()}"
                    + (f" ({'; '.join(changed)})" if changed else "")))
    return out


def _canonical(overrides: list[str]) -> list[str]:
    from dograph.runs.app import canonical_overrides  # heavy import, only when a stale record is explained

    return canonical_overrides(overrides)


def sync_records(source: Path, target: Path) -> list[str]:
    """Copy into ``target`` (a ``results/<scale>/runs``) the records of ``source`` (the same folder of another
    checkout, e.g. a worktree a long study runs from) that ``target`` lacks, and the ``derived/`` files a record
    there gained later (points computed from the live run's checkpoints). Returns what was copied."""
    copied = []
    for record in sorted(p.parent for p in source.glob(f"*/{RECORD_FILE}")):
        mine = target / record.name
        if not mine.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{record.name}.tmp-", dir=target))
            shutil.copytree(record, tmp, dirs_exist_ok=True)
            publish_directory(tmp, mine)
            copied.append(record.name)
            continue
        for path in sorted((record / DERIVED).glob("*")) if (record / DERIVED).is_dir() else []:
            if path.is_file() and not (mine / DERIVED / path.name).exists():
                (mine / DERIVED).mkdir(exist_ok=True)
                shutil.copyfile(path, mine / DERIVED / path.name)
                copied.append(f"{record.name}/{DERIVED}/{path.name}")
    return copied


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Copy run records from another checkout's results folder.")
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("source", type=Path, help="results/<scale>/runs of the other checkout")
    parser.add_argument("target", type=Path, help="results/<scale>/runs here")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: {args.source} is no folder of records", file=sys.stderr)
        return 2
    args.target.mkdir(parents=True, exist_ok=True)
    copied = sync_records(args.source, args.target)
    print("\n".join(copied) if copied else "nothing new")
    return 0


if __name__ == "__main__":
    sys.exit(main())
