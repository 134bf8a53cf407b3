"""Uniform: the corpus's natural mixture, every sample weighs 1/B (docs/design.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dograph.mixing import Mixer, MixerOutput, StepSignals
from dograph.settings import Settings


@dataclass
class UniformSettings(Settings):
    """``conf/mixer/uniform.yaml``: no settings of its own."""

    _target_: str  # baselines.uniform.UniformMixer


class UniformMixer(Mixer):
    """Never reweights and never changes the mixture, so the trainer runs no mixer code."""

    name = "uniform"  # the registered method name (dograph.mixing.MIXERS)
    settings_class = UniformSettings
    reweights = False

    def __init__(self, **_: Any) -> None:
        """Runtime arguments (domains, dist, seed) are accepted and unused."""

    def weigh(self, signals: StepSignals) -> MixerOutput:
        return MixerOutput()
