"""The step runner a mixer needs: the one place that knows both the plain runners and the projected step."""

from __future__ import annotations

from dograph.mixing import Signal
from dograph.step.projected import ProjectedStep
from dograph.step.runners import PlainStep, ReweightStep, StepContext, StepRunner


def build_step_runner(ctx: StepContext, weighted_update: str = "fast") -> StepRunner:
    """The cheapest runner that gives the mixer what it declared it needs."""
    if Signal.GRAD_PROJ in ctx.mixer.requires or Signal.DOMAIN_GRAM in ctx.mixer.requires:
        return ProjectedStep(ctx, two_pass=weighted_update == "two_pass")
    return ReweightStep(ctx) if ctx.mixer.reweights else PlainStep(ctx)
