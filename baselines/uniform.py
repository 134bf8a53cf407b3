"""Uniform: the corpus's natural mixture, every sample weighs 1/B (docs/design.md section 3)."""

from __future__ import annotations

from typing import Any

from dograph.mixing import Mixer, MixerOutput, StepSignals


class UniformMixer(Mixer):
    """Never reweights and never changes the mixture, so the trainer runs no mixer code."""

    name = "uniform"  # the registered method name (dograph.mixing.MIXERS)
    reweights = False

    def __init__(self, **_: Any) -> None:
        """Runtime arguments (domains, dist, seed) are accepted and unused."""

    def weigh(self, signals: StepSignals) -> MixerOutput:
        return MixerOutput()
