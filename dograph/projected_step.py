"""The step runner for mixers that read projected per-sample gradients (docs/design.md sections 2.1, 2.5).

Fast path (default): each micro-batch is forwarded and backpropagated once with the
capture hooks on (no weight gradients computed by autograd); the mixer weighs the whole
step; then :meth:`GradientCapture.apply_weights` forms ``sum_i v_i g_i`` from the kept
inputs and output-grads. With gradient accumulation the weights need every micro-batch's
projections, so every micro-batch's inputs and output-grads are kept until the end of the
window (exact; memory grows with the accumulation steps).

Two-pass reference (``trainer.weighted_update=two_pass``): the capturing pass keeps
nothing; after weighing, each micro-batch is forwarded again and ``sum_i v_i l_i`` is
backpropagated by autograd. Both paths give the same gradients (tested).

Gradients are summed over ranks explicitly: the capture bypasses autograd's weight
gradients, so DDP's reducer would never see them (docs/design.md section 6).
"""

from __future__ import annotations

import torch

from dograph.capture import GradientCapture
from dograph.data.sampler import Batch
from dograph.distributed import all_reduce_gradients
from dograph.errors import ConfigError
from dograph.signals import StepContext, StepResult, StepRunner, resolve_weights, step_signals


class ProjectedStep(StepRunner):
    def __init__(self, ctx: StepContext, *, two_pass: bool = False) -> None:
        super().__init__(ctx)
        projector = ctx.mixer.projector
        if projector is None:
            raise ConfigError(f"{type(ctx.mixer).__name__} requires projected gradients but has no projector")
        if getattr(ctx.model, "_compiled_call_impl", None) is not None:
            raise ConfigError("trainer.compile=true is not supported with a mixer that reads projected per-sample "
                              "gradients (its hooks run eagerly): set trainer.compile=false")
        self.two_pass = two_pass
        self.capture = GradientCapture(ctx.model, projector.bind(ctx.model), keep_for_update=not two_pass)

    def _capture_pass(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, projected = [], []
        with self.capture.capturing():
            for batch in micro_batches:
                self.capture.start_micro_batch(len(batch))
                loss = self.forward_loss(batch)
                loss.sum().backward()
                losses.append(loss.detach())
                projected.append(self.capture.end_micro_batch())
        return torch.cat(losses), torch.cat(projected)

    def run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        loss, projected = self._capture_pass(micro_batches)
        out = self.ctx.mixer.weigh(step_signals(self.ctx, step, micro_batches, loss, grad_proj=projected))
        metrics = {**out.metrics, "mixer/time_projection_s": self.capture.timer}
        if out.skip_step:
            self.capture.micro = []
            return StepResult(loss, skipped=True, metrics=metrics)
        weights = resolve_weights(self.ctx, out, loss).split([len(b) for b in micro_batches])
        if self.two_pass:
            for batch, micro_weights in zip(micro_batches, weights, strict=True):
                (self.forward_loss(batch) * micro_weights).sum().backward()
        else:
            self.capture.apply_weights(list(weights))
        all_reduce_gradients(self.ctx.dist, list(self.ctx.model.parameters()))
        return StepResult(loss, metrics=metrics, weights=out.sample_weights)
