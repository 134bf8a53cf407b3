"""Static sampling mixtures over human domains (docs/design.md section 3).

``mixer=fixed`` samples every batch from one mixture, given as numbers (in the dataset's
domain order, or as ``{domain: weight}``) or by the name of a published mixture. Like
``uniform`` it never reweights, so the trainer runs no mixer code in the step: the
mixture reaches the sampler before the first step and stays.

The offline methods' main runs (DoReMi, DoGE) are a fixed mixture too, read from the
output of their last pipeline stage (:class:`StageMixtureMixer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dograph.errors import ConfigError
from dograph.mixer_history import DomainWeightHistory
from dograph.mixing import Mixer, MixerOutput, StepSignals
from dograph.runs.pipeline import StageResult
from dograph.settings import Settings

SLIMPAJAMA = ("RedPajamaArXiv", "RedPajamaBook", "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub",
              "RedPajamaStackExchange", "RedPajamaWikipedia")

# Published mixtures, by name: the weights over a corpus's domains and where they come from.
PUBLISHED_MIXTURES: dict[str, dict[str, Any]] = {
    "doremi_slimpajama": {
        # DoReMi's weights for SlimPajama (50k vocabulary) as the DoGE repository ships them:
        # Olivia-fsm/DoGE config/gpt_base/reweight_doremi50k.json (order arxiv, book, cc, c4,
        # github, stackexchange, wikipedia); the loss-based reweighting code samples with them
        # (sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025 config/methods/ours_doremi_large.json).
        "weights": dict(zip(SLIMPAJAMA, (0.04235, 0.08201, 0.381, 0.1141, 0.0654, 0.0847, 0.2305), strict=True)),
        "source": "Olivia-fsm/DoGE config/gpt_base/reweight_doremi50k.json",
    },
    "doge_slimpajama": {
        # DoGE's weights for SlimPajama: Olivia-fsm/DoGE config/gpt_base/reweight_doge.json.
        "weights": dict(zip(SLIMPAJAMA, (0.088, 0.045, 0.269, 0.214, 0.070, 0.166, 0.148), strict=True)),
        "source": "Olivia-fsm/DoGE config/gpt_base/reweight_doge.json",
    },
    "doremi_pile": {
        # DoReMi's 280M-proxy weights for the full Pile (22 domains, the paper's Table):
        # sangmichaelxie/doremi configs/pile_doremi_280M_256kvocab_paper.json. The uncopyrighted
        # Pile lacks 5 of its domains: use mixer.renormalise_subset=true to renormalise over the rest.
        "weights": {"Pile-CC": 0.6057, "PubMed Central": 0.0046, "Books3": 0.0224, "OpenWebText2": 0.1019,
                    "ArXiv": 0.0036, "Github": 0.0179, "FreeLaw": 0.0043, "StackExchange": 0.0153,
                    "USPTO Backgrounds": 0.0036, "PubMed Abstracts": 0.0113, "Gutenberg (PG-19)": 0.0072,
                    "OpenSubtitles": 0.0047, "Wikipedia (en)": 0.0699, "DM Mathematics": 0.0018,
                    "Ubuntu IRC": 0.0093, "BookCorpus2": 0.0061, "EuroParl": 0.0062, "HackerNews": 0.0134,
                    "YoutubeSubtitles": 0.0502, "PhilPapers": 0.0274, "NIH ExPorter": 0.0063,
                    "Enron Emails": 0.007},
        "source": "sangmichaelxie/doremi configs/pile_doremi_280M_256kvocab_paper.json",
    },
}


def resolve_mixture(mixture: str | Sequence[float] | Mapping[str, float], domains: Sequence[str], *,
                    renormalise_subset: bool = False, key: str = "mixer.mixture") -> list[float]:
    """A probability vector over ``domains`` from numbers, ``{domain: weight}`` or a published name.

    Errors (one line, naming ``key``): an unknown name (listing the registry), domains that do
    not match the dataset's (listing both), a wrong length, a negative or non-finite entry,
    an all-zero mixture.
    """
    domains = list(domains)
    if isinstance(mixture, str):
        if mixture not in PUBLISHED_MIXTURES:
            raise ConfigError(f"{key}={mixture!r} is not a published mixture: choose one of "
                              f"{', '.join(sorted(PUBLISHED_MIXTURES))}, or give numbers")
        return resolve_mixture(PUBLISHED_MIXTURES[mixture]["weights"], domains,
                               renormalise_subset=renormalise_subset, key=f"{key} ({mixture})")
    if isinstance(mixture, Mapping):
        named = dict(mixture)
        covered = set(domains) <= set(named) if renormalise_subset else set(domains) == set(named)
        if not covered:
            raise ConfigError(f"{key}: its domains ({', '.join(named)}) do not match the dataset's "
                              f"({', '.join(domains)})")
        values = [named[d] for d in domains]
    else:
        values = list(mixture)
        if len(values) != len(domains):
            raise ConfigError(f"{key} has {len(values)} entries; the dataset has {len(domains)} domains "
                              f"({', '.join(domains)})")
    if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"{key} must be finite and non-negative (got {values})")
    total = float(sum(values))
    if total <= 0:
        raise ConfigError(f"{key} must have a positive sum (got {values})")
    return [float(v) / total for v in values]


@dataclass
class FixedSettings(Settings):
    """``conf/mixer/fixed.yaml``: the mixture, checked against the dataset's domains when the mixer is built."""

    _target_: str  # baselines.fixed.FixedMixer
    mixture: Any  # required: numbers in the dataset's domain order, {domain: weight}, or a published mixture's name
    renormalise_subset: bool  # true: a named mixture may cover more domains than the dataset; renormalise


class FixedMixer(Mixer):
    """One sampling mixture for the whole run; every sample weighs 1/B (no work in the step)."""

    name = "fixed"  # the registered method name (dograph.mixing.MIXERS)
    settings_class = FixedSettings
    reweights = False

    def __init__(self, *, mixture: str | Sequence[float] | Mapping[str, float] | None = None,
                 renormalise_subset: bool = False, domains: Sequence[str] = (), **_: Any) -> None:
        if mixture is None:
            raise ConfigError("mixer.mixture must be set: numbers in the dataset's domain order, or a published "
                              f"mixture ({', '.join(sorted(PUBLISHED_MIXTURES))})")
        self.domains = list(domains)
        self.mixture = resolve_mixture(mixture, self.domains, renormalise_subset=renormalise_subset)
        self.history = DomainWeightHistory(self.domains)
        self.history.record(0, self.mixture)

    def sampling_mixture(self) -> Tensor:
        return torch.tensor(self.mixture, dtype=torch.float64)

    def weigh(self, signals: StepSignals) -> MixerOutput:
        return MixerOutput()

    def outputs(self) -> dict[str, Any]:
        return {"mixture": dict(zip(self.domains, self.mixture, strict=True))}

    def save_artifacts(self, out_dir: Path) -> None:
        self.history.save(out_dir)

    def summary(self) -> dict[str, Any]:
        rows = "\n".join(f"| {d} | {w:.4f} |" for d, w in zip(self.domains, self.mixture, strict=True))
        return {"Sampling mixture (fixed for the run)": "| domain | weight |\n|---|---|\n" + rows}


class StageMixtureMixer(FixedMixer):
    """The main run of an offline method: the mixture its stage ``mixture_from`` produced."""

    def __init__(self, *, mixture_from: str, stage_results: Mapping[str, StageResult] | None = None,
                 domains: Sequence[str] = (), **rest: Any) -> None:
        results = dict(stage_results or {})
        if mixture_from not in results:
            raise ConfigError(f"mixer.mixture_from={mixture_from!r} names no stage of this method "
                              f"(stages: {', '.join(results) or 'none'})")
        produced = results[mixture_from].outputs.get("mixture")
        if produced is None:
            raise ConfigError(f"stage {mixture_from!r} ({results[mixture_from].run_dir}) produced no mixture")
        rest.pop("mixture", None)
        super().__init__(mixture=produced, domains=domains, **rest)
        self.source = results[mixture_from]

    def summary(self) -> dict[str, Any]:
        rows = "\n".join(f"| {d} | {w:.4f} |" for d, w in zip(self.domains, self.mixture, strict=True))
        title = f"Sampling mixture from stage {self.source.name} ({self.source.run_dir})"
        return {title: "| domain | weight |\n|---|---|\n" + rows}
