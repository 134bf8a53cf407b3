"""The main run of a regression method: a model of loss vs mixture fitted on a proxy sweep (docs/design.md 3.1, 3.2).

RegMix and Data Mixing Laws share everything but the design of the proxies' mixtures and the
fit: both declare a proxy sweep (``plan_sweep``: one small run per mixture, ``dograph.runs.sweep``),
fit a model from mixture to validation loss on the proxies' own results, choose the mixture
the model predicts best and sample it for the whole main run (a fixed mixture: no work in
the step). Each writes the fit's quality, the chosen mixture and its predicted loss
(``fit.json``) and a plot of predicted vs measured loss over the proxies
(``predicted_vs_measured.png``) to the sweep's directory and to the main run's ``mixer/``.

Sweep settings in the method's config: ``proxies`` (how many), ``min_proxies`` (the fit
refuses fewer successes), ``sweep_seed`` (the design's seed), ``launcher`` and
``launcher_overrides`` (Hydra launcher of the proxies), ``proxy`` (their stage settings:
model, trainer preset, tokenizer, seed, any trainer field).
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from baselines.fixed import FixedMixer
from dograph.atomic import replace_atomically, write_text_atomically
from dograph.errors import ConfigError
from dograph.reporting import markdown_table
from dograph.runs.sweep import SweepResult, SweepSpec
from dograph.settings import require

SWEEP_KEYS = ("proxies", "min_proxies", "sweep_seed", "launcher", "launcher_overrides", "proxy")


@dataclass
class FitOutcome:
    """What a regression method's fit chose, and how good the fit is."""

    mixture: np.ndarray  # [D] the chosen mixture
    predicted_loss: float  # the model's prediction for it (the target it minimises)
    target: str  # what the model predicts (e.g. "natural-mixture average validation loss")
    quality: dict[str, Any]  # held-out Spearman / R^2, residuals, ...
    measured: np.ndarray  # [n] the target on the successful proxies
    predicted: np.ndarray  # [n] the model's prediction for them
    # proxies the reported quality was measured on, left out of the fit that predicted them
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def check_sweep_counts(proxies: int, min_proxies: int) -> None:
    """``mixer.proxies`` >= 2 and ``mixer.min_proxies`` in [2, proxies] (a method's settings may ask for more)."""
    require(proxies >= 2, "mixer.proxies", "must be >= 2", proxies)
    require(2 <= min_proxies <= proxies, "mixer.min_proxies", f"must be in [2, mixer.proxies={proxies}]", min_proxies)


def sweep_settings(node: dict[str, Any]) -> tuple[int, int, int, str, tuple[str, ...], dict[str, Any]]:
    """(proxies, min_proxies, sweep_seed, launcher, launcher_overrides, proxy stage settings) of a checked node."""
    overrides = tuple(str(o) for o in (node.get("launcher_overrides") or ()))
    return (node["proxies"], node["min_proxies"], int(node.get("sweep_seed", 0)), str(node.get("launcher", "basic")),
            overrides, dict(node["proxy"]))


class SweepFitMixer(FixedMixer):
    """Fit on the proxy sweep, then sample the chosen mixture for the whole run."""

    has_sweep = True
    label = "regression"

    @classmethod
    @abstractmethod
    def design(cls, node: dict[str, Any], count: int, seed: int, domains: list[str],
               natural_mixture: list[float]) -> np.ndarray:
        """[count, D] mixtures of the proxies."""

    @abstractmethod
    def fit(self, mixtures: np.ndarray, losses: np.ndarray) -> FitOutcome:
        """The fitted model's choice from the proxies' mixtures [n, D] and per-domain losses [n, D]."""

    @classmethod
    def plan_sweep(cls, node: dict[str, Any], domains: list[str], natural_mixture: list[float]) -> SweepSpec:
        proxies, minimum, seed, launcher, overrides, proxy = sweep_settings(node)
        mixtures = np.asarray(cls.design(node, proxies, seed, domains, natural_mixture), dtype=np.float64)
        return SweepSpec("proxy", {"_target_": "baselines.fixed.FixedMixer"}, mixtures.tolist(), dict(proxy),
                         min_success=minimum, launcher=launcher, launcher_overrides=overrides)

    def __init__(self, *, sweep: SweepResult | None = None, domains: Sequence[str] = (),
                 natural_mixture: Sequence[float] = (), dist: Any = None, seed: int = 0, **settings: Any) -> None:
        """``seed`` is the main run's (unused: the fit has its own, so every main-run seed gets the same mixture)."""
        if sweep is None:
            raise ConfigError(f"{type(self).__name__} needs the results of its proxy sweep (run it with run.py)")
        self.domains, self.natural_mixture = list(domains), list(natural_mixture)
        self.settings = {k: v for k, v in settings.items() if k not in SWEEP_KEYS}
        self.sweep = sweep
        mixtures, losses = sweep.arrays()
        self.outcome = self.fit(mixtures, losses)
        super().__init__(mixture=[float(w) for w in self.outcome.mixture], domains=domains)
        if dist is None or dist.is_main:
            self.write_report(sweep.directory, suffix=f"-{self.fit_key()}")

    def fit_key(self) -> str:
        """A short hash of the fit's settings (reports of different fits on one sweep sit side by side)."""
        text = json.dumps({"class": type(self).__name__, **self.settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def report(self) -> dict[str, Any]:
        o = self.outcome
        return {"method": self.label, "target": o.target, "predicted_loss": o.predicted_loss,
                "mixture": dict(zip(self.domains, [float(w) for w in o.mixture], strict=True)),
                "quality": o.quality, "proxies": len(self.sweep.outcomes), "succeeded": len(self.sweep.successful),
                "sweep_table": str(self.sweep.table), "sweep_training_s": self.sweep.wall_time_s(),
                "settings": self.settings}

    def write_report(self, directory: Path, suffix: str = "") -> None:
        """``fit.json`` and the plot; each written under a temporary name of this process, then renamed
        (main runs that share a sweep write the same files into its directory)."""
        write_text_atomically(directory / f"fit{suffix}.json", json.dumps(self.report(), indent=2, default=str))
        plot_predicted_vs_measured(self.outcome, self.label, directory / f"predicted_vs_measured{suffix}.png")

    def save_artifacts(self, out_dir: Path) -> None:
        super().save_artifacts(out_dir)
        self.write_report(out_dir)

    def outputs(self) -> dict[str, Any]:
        return {**super().outputs(), "fit": self.report()}

    def summary(self) -> dict[str, Any]:
        o, q = self.outcome, self.outcome.quality
        quality = ", ".join(f"{k} {v:.3f}" for k, v in q.items() if isinstance(v, float))
        rows = [[d, float(w)] for d, w in zip(self.domains, o.mixture, strict=True)]
        title = (f"{self.label} mixture ({len(self.sweep.successful)} of {len(self.sweep.outcomes)} proxies; "
                 f"predicted {o.target} {o.predicted_loss:.4f}; fit: {quality})")
        return {title: markdown_table(["domain", "weight"], rows)}


def plot_predicted_vs_measured(outcome: FitOutcome, label: str, path: Path) -> None:
    """A PNG scatter of the model's prediction against the measured target over the proxies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    fitted = np.ones(len(outcome.measured), dtype=bool)
    fitted[outcome.held_out] = False
    ax.scatter(outcome.measured[fitted], outcome.predicted[fitted], s=18, label="fitted proxies")
    if (~fitted).any():
        ax.scatter(outcome.measured[~fitted], outcome.predicted[~fitted], s=24, marker="s",
                   label="held-out proxies (not fitted on)")
    low = float(min(outcome.measured.min(), outcome.predicted.min()))
    high = float(max(outcome.measured.max(), outcome.predicted.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set_xlabel(f"measured {outcome.target}")
    ax.set_ylabel(f"predicted {outcome.target}")
    ax.set_title(f"{label}: {len(outcome.measured)} proxies", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
