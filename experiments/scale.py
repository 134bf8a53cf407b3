"""A scale (smoke | cpu | paper, and the planted-structure study) of the experiments, and the runs an artifact asks for.

The scale's settings live in ``conf/reproduce/<scale>.yaml`` (models and datasets standing for
the paper's settings, seeds, the overrides every run gets). A :class:`RunRequest` names one run
by what identifies it in the results index (method, model, dataset, seed, for DoGraph m and
the objective, and on a planted corpus its scenario); :func:`request_overrides` turns it into the
``run.py`` command line, and the fingerprint of that command line (:func:`make_request`) is what a
run must carry to count for it (``run_info.json``: a hand-made run with other settings, or a run
of an older ``common``, does not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.index import IDENTITY, OPTIONAL_IDENTITY, VARIANT_TAG, complete, dataset_label

REPO = Path(__file__).resolve().parent.parent
SCALES = ("smoke", "cpu", "paper", "planted", "pays")  # planted, pays: their own registries (issues 18, 19)
GROUPS = ("paper", "planted", "pays")  # the registries (experiments.paper, .planted, .pays); a scale serves one
DEFAULT_OBJECTIVE = "uncertainty"  # conf/config.yaml
DEFAULT_M = 11  # conf/config.yaml


@dataclass(frozen=True)
class Scale:
    """``conf/reproduce/<name>.yaml`` as a typed object; paths are absolute (relative ones from the repository)."""

    name: str
    runs_root: Path
    results_dir: Path
    launch: str  # train | print
    seeds: list[int]
    methods: list[str]
    common: list[str]
    method_overrides: dict[str, list[str]]
    settings: dict[str, dict[str, str]]
    model_scale: list[str]
    m_values: list[int]
    objectives: list[str]
    corpora: dict[str, str]
    description: str = ""
    jobs: int = 1  # runs trained side by side (each with the cores shared out): benchmarks/cpu_jobs.py
    scenarios: list[str] = field(default_factory=list)  # dataset.planted.scenario of each planted study (issue 18)
    group: str = "paper"  # the registry whose artifacts this scale builds (GROUPS)
    reads: list[str] = field(default_factory=list)  # other scales whose runs and records it reads too (issue 19)
    study: dict[str, Any] = field(default_factory=dict)  # a study's own design (conf/reproduce/pays.yaml: study)

    @property
    def cache_dir(self) -> Path:
        """The data and tokenizer cache the runs use (conf/paths/default.yaml: DOGRAPH_CACHE or .cache/dograph)."""
        return Path(os.environ.get("DOGRAPH_CACHE", REPO / ".cache" / "dograph"))

    def setting(self, name: str) -> dict[str, str]:
        """The model and dataset standing for a paper setting (e.g. ``slimpajama_medium``)."""
        if name not in self.settings:
            raise KeyError(f"conf/reproduce/{self.name}.yaml has no settings.{name}")
        return self.settings[name]


def load_scale(name: str, *, runs_root: str | Path | None = None, results_dir: str | Path | None = None) -> Scale:
    """Read ``conf/reproduce/<name>.yaml`` (``runs_root``/``results_dir`` override the file's)."""
    path = REPO / "conf" / "reproduce" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown scale {name!r}: choose one of {', '.join(SCALES)} (conf/reproduce/)")
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    header = path.read_text().split("\nname:")[0]
    root = Path(runs_root or raw["runs_root"])
    results = Path(results_dir or raw["results_dir"])
    return Scale(name=raw["name"], runs_root=root if root.is_absolute() else REPO / root,
                 results_dir=results if results.is_absolute() else REPO / results, launch=raw["launch"],
                 seeds=[int(s) for s in raw["seeds"]], methods=list(raw["methods"]), common=list(raw["common"]),
                 method_overrides={k: list(v) for k, v in (raw.get("method_overrides") or {}).items()},
                 settings=dict(raw["settings"]), model_scale=list(raw.get("model_scale") or []),
                 m_values=[int(m) for m in raw.get("m_values") or []], objectives=list(raw.get("objectives") or []),
                 corpora=dict(raw.get("corpora") or {}), jobs=int(raw.get("jobs", 1)),
                 scenarios=list(raw.get("scenarios") or []), group=str(raw.get("group", "paper")),
                 reads=list(raw.get("reads") or []), study=dict(raw.get("study") or {}),
                 description=" ".join(line.lstrip("# ").strip() for line in header.splitlines()))


def model_tokenizer(model: str) -> str:
    """The tokenizer ``conf/model/<model>.yaml`` names."""
    return str(yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())["tokenizer"])


@dataclass(frozen=True)
class RunRequest:
    """One run an artifact needs, by its identity in the results index."""

    method: str
    model: str
    dataset: str
    seed: int
    m: int = DEFAULT_M
    objective: str = DEFAULT_OBJECTIVE
    scenario: str | None = None  # dataset.planted.scenario (None: not set on the command line)
    variant: str | None = None  # a named set of extra overrides (``options``; tag ``variant:NAME``), e.g. ``tilt``
    options: tuple[str, ...] = field(default=(), compare=False)  # the variant's overrides (they win over common)
    sweep: str = field(default="methods", compare=False)  # the conf/experiment sweep that makes it by hand
    fingerprint: str | None = field(default=None, compare=False)  # of request_overrides at its scale (make_request)

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"method": self.method, "model": self.model, "dataset": self.dataset}
        if self.scenario is not None:  # only planted runs have it (the other requests' identity is unchanged)
            ident["scenario"] = self.scenario
        if self.variant is not None:  # only a study's variant runs have it (issue 19)
            ident["variant"] = self.variant
        ident["seed"] = self.seed
        if self.method == "dograph":  # m and the objective mean nothing to the other methods
            ident.update(m=self.m, objective=self.objective)
        return ident

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.identity().items())

    def run_dir(self, scale: Scale) -> Path:
        variant = f"m{self.m}_{self.objective}" if self.method == "dograph" else "default"
        variant += f"_{self.variant}" if self.variant is not None else ""
        dataset = dataset_label(self.dataset, self.scenario)
        return scale.runs_root / "runs" / self.method / self.model / dataset / variant / f"seed{self.seed}"

    def dataset_overrides(self) -> list[str]:
        """The overrides of the dataset's options this request sets beyond ``dataset=NAME`` (its scenario)."""
        return [] if self.scenario is None else [f"dataset.planted.scenario={self.scenario}"]


def request_overrides(request: RunRequest, scale: Scale) -> list[str]:
    """The ``run.py`` overrides of one request at ``scale`` (its run directory fixed, not derived)."""
    out = [f"mixer={request.method}", f"model={request.model}", f"dataset={request.dataset}",
           *request.dataset_overrides(), f"seed={request.seed}"]
    if request.method == "dograph":
        out += [f"m={request.m}", f"objective={request.objective}"]
    extra = [*scale.common, *scale.method_overrides.get(request.method, [])]
    if request.variant is not None:  # the variant's overrides replace those of the same keys; its tag names it
        keys = {option.split("=", 1)[0] for option in request.options}
        extra = [o for o in extra if o.split("=", 1)[0] not in keys] + [*request.options,
                                                                          f"tags=[{VARIANT_TAG}{request.variant}]"]
    return [*out, *extra, f"paths.output_root={scale.runs_root}", f"hydra.run.dir={request.run_dir(scale)}"]


def same_identity(row: pd.Series | dict[str, Any], request: RunRequest) -> bool:
    """``row`` (an index row) is a run of ``request``'s identity: every key equal, and the optional keys the
    request lacks (scenario, variant) absent from the row too, so a variant run never passes for the plain one."""
    ident = request.identity()
    for key in IDENTITY:
        value = row.get(key)
        if key in ident:
            if value != ident[key]:
                return False
        elif key in OPTIONAL_IDENTITY and isinstance(value, str):
            return False
    return True


def make_request(scale: Scale, method: str, model: str, dataset: str, seed: int, **kwargs: Any) -> RunRequest:
    """A request at ``scale``, with the fingerprint of the overrides the scale gives it (``kwargs``: m, objective,
    scenario, sweep)."""
    from dograph.runs.app import overrides_fingerprint  # the function run.py records with (imported when needed: heavy)

    request = RunRequest(method, model, dataset, seed, **kwargs)
    return replace(request, fingerprint=overrides_fingerprint(request_overrides(request, scale)))


def method_requests(scale: Scale, setting: str, methods: list[str] | None = None) -> list[RunRequest]:
    """Every method x seed on one paper setting (Tables 1-5)."""
    where = scale.setting(setting)
    return [make_request(scale, method, where["model"], where["dataset"], seed)
            for method in (methods or scale.methods) for seed in scale.seeds]


def find_run(index: pd.DataFrame, request: RunRequest) -> pd.DataFrame:
    """The complete runs in ``index`` made with exactly the overrides ``request`` asks for (completed last, last).

    A run counts only when its fingerprint (``run_info.json``) is the request's: same identity, same
    ``common`` and ``method_overrides`` of the scale. Several such runs (one made by the scale, one by
    hand with the same command line) are ordered by ``completed_at``; callers take the last.
    """
    if request.fingerprint is None:
        raise ValueError(f"request {request.label()} has no fingerprint: build it with make_request(scale, ...)")
    if index.empty or "status" not in index.columns or "fingerprint" not in index.columns:
        return index.iloc[0:0]
    frame = complete(index)
    for key, value in request.identity().items():
        if key not in frame.columns:
            return frame.iloc[0:0]
        frame = frame[frame[key] == value]
    frame = frame[frame["fingerprint"] == request.fingerprint]
    return frame.sort_values("completed_at", kind="stable") if "completed_at" in frame.columns else frame


def rows_for(index: pd.DataFrame, requests: list[RunRequest]) -> pd.DataFrame:
    """The complete runs of ``requests`` (one per request: the one completed last when several match)."""
    frames = [found.tail(1) for r in requests if not (found := find_run(index, r)).empty]
    return pd.concat(frames) if frames else index.iloc[0:0]
