"""The step runner for mixers that read gradient signals: projected per-sample gradients or the domain Gram.

(docs/design.md sections 2.1, 2.5.) Fast path (default): each micro-batch is forwarded and
backpropagated once with the capture hooks on (no weight gradients computed by autograd);
the mixer weighs the whole step; then :meth:`GradientCapture.apply_weights` forms
``sum_i v_i g_i`` from the kept inputs and output-grads. With gradient accumulation the
weights need every micro-batch's signals, so every micro-batch's inputs and output-grads are
kept until the end of the window (exact; memory grows with the accumulation steps).

Two-pass reference (``trainer.weighted_update=two_pass``): after weighing, each micro-batch
is forwarded again and ``sum_i v_i l_i`` is backpropagated by autograd. Both paths give the
same gradients (tested).

``Signal.GRAD_PROJ``: the hooks project per-sample gradients (the mixer's ``projector``).
``Signal.DOMAIN_GRAM`` (DoGE): after the capturing backward, the global per-domain sample
counts ``n_d`` (an all-reduce of the local counts), ``W[d, i] = 1[d(i) = d] / n_d`` and the
``[D, D]`` Gram of the global per-domain mean-loss gradients from the kept tensors
(:meth:`GradientCapture.weighted_gram`: exact, one backward, each parameter's ``[D, ...]``
stack summed over ranks); the kept tensors then serve the update as above. The samples of
each micro-batch are put in domain order first (each domain's rows are then one contiguous
slice of every kept tensor: no gathers); the mixer sees that order, and the step's losses and
weights are returned in the sampler's.

Gradients are summed over ranks explicitly: the capture bypasses autograd's weight
gradients, so DDP's reducer would never see them (docs/design.md section 6).

Under FSDP2 (``trainer.parallelism=fsdp``) the capturing pass needs no weight (the hooks read
layer inputs and output-grads, which FSDP never shards, so the projections are those of one
process). The one-backward update forms each parameter's whole local gradient from the kept
tensors (the small modules' re-forwards all-gather their parameters) and hands it to a
:class:`~dograph.parallel.ShardedGradientReducer`, which reduce-scatters it into the shards as
FSDP's own backward would; the domain Gram all-reduces its ``[D, n]`` stacks as under DDP. The
two-pass update's second pass is an ordinary backward whose gradients FSDP reduce-scatters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dograph.data.sampler import Batch
from dograph.distributed import all_reduce_gradients, all_reduce_sum
from dograph.errors import ConfigError
from dograph.mixing import Signal
from dograph.parallel import ShardedGradientReducer
from dograph.step.capture import GradientCapture
from dograph.step.runners import StepContext, StepResult, StepRunner, backward_weighted, resolve_weights, step_signals
from dograph.step.timing import StepTimer


def sort_by_domain(micro_batches: list[Batch]) -> tuple[list[Batch], Tensor]:
    """Each micro-batch in domain order (stable), and the step's permutation (sorted row j = original order[j])."""
    out, order, offset = [], [], 0
    for batch in micro_batches:
        perm = torch.argsort(batch.domain, stable=True)
        out.append(Batch(batch.input_ids[perm], batch.targets[perm], batch.domain[perm]))
        order.append(perm + offset)
        offset += len(batch)
    return out, torch.cat(order)


def unsort(values: Tensor | None, order: Tensor) -> Tensor | None:
    if values is None:
        return None
    out = torch.empty_like(values)
    out[order.to(values.device)] = values
    return out


def domain_weight_matrix(domain: Tensor, counts: Tensor) -> Tensor:
    """``[D, b]`` float32 ``W[d, i] = 1[domain_i = d] / n_d`` (0 for a domain absent from the global batch)."""
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(1).double(), 0.0)
    onehot = torch.nn.functional.one_hot(domain.long(), len(counts)).T.double()  # [D, b]
    return (onehot * inverse.unsqueeze(1)).float()


class ProjectedStep(StepRunner):
    def __init__(self, ctx: StepContext, *, two_pass: bool = False) -> None:
        super().__init__(ctx)
        projector = ctx.mixer.projector
        self.needs_gram = Signal.DOMAIN_GRAM in ctx.mixer.requires
        if Signal.GRAD_PROJ in ctx.mixer.requires and projector is None:
            raise ConfigError(f"{type(ctx.mixer).__name__} requires projected gradients but has no projector")
        if getattr(ctx.model, "_compiled_call_impl", None) is not None:
            raise ConfigError("trainer.compile=true is not supported with a mixer that reads per-sample gradient "
                              "signals (its hooks run eagerly): set trainer.compile=false")
        self.two_pass = two_pass
        bound = projector.bind(ctx.model) if projector is not None else None
        # the Gram reads the kept inputs and output-grads, so they are kept even for the two-pass update
        self.capture = GradientCapture(ctx.model, bound, keep_for_update=not two_pass or self.needs_gram)

    def _capture_pass(self, micro_batches: list[Batch]) -> tuple[Tensor, Tensor | None]:
        losses, projected = [], []
        with self.capture.capturing():
            for batch in micro_batches:
                self.capture.start_micro_batch(len(batch))
                loss = self.forward_loss(batch)
                loss.sum().backward()
                losses.append(loss.detach())
                projected.append(self.capture.end_micro_batch())
        return torch.cat(losses), (torch.cat(projected) if projected[0] is not None else None)

    def _domain_gram(self, micro_batches: list[Batch]) -> dict[str, Any]:
        """The global per-domain counts and the Gram of the per-domain mean-loss gradients."""
        timer = StepTimer(self.capture.device)
        with timer.measure():
            domains = [b.domain.to(self.capture.device) for b in micro_batches]
            counts = torch.bincount(torch.cat(domains), minlength=self.ctx.num_domains)
            counts = all_reduce_sum(self.ctx.dist, counts)
            weights = [domain_weight_matrix(d, counts) for d in domains]
            gram = self.capture.weighted_gram(weights, self.ctx.dist)
        return {"domain_gram": gram, "domain_counts": counts, "_timer": timer}

    def run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        order = None
        if self.needs_gram:
            micro_batches, order = sort_by_domain(micro_batches)
        result = self._run(step, micro_batches)
        if order is not None:
            result.loss, result.weights = unsort(result.loss, order), unsort(result.weights, order)
        return result

    def _run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        loss, projected = self._capture_pass(micro_batches)
        measured: dict[str, Any] = {}
        if projected is not None:
            measured["grad_proj"] = projected
        metrics: dict[str, Any] = {}
        if self.needs_gram:
            measured.update(self._domain_gram(micro_batches))
            metrics["mixer/time_gram_s"] = measured.pop("_timer")
        out = self.ctx.mixer.weigh(step_signals(self.ctx, step, micro_batches, loss, **measured))
        metrics = {**out.metrics, **metrics}
        if projected is not None:
            metrics["mixer/time_projection_s"] = self.capture.timer
        if out.skip_step:
            self.capture.micro = []
            return StepResult(loss, skipped=True, metrics=metrics)
        weights = resolve_weights(self.ctx, out, loss).split([len(b) for b in micro_batches])
        if self.two_pass:
            self.capture.micro = []
            # one micro-batch forwarded at a time (its graph freed by its backward): the weights are known
            for i, (batch, micro_weights) in enumerate(zip(micro_batches, weights, strict=True)):
                backward_weighted(self.ctx, [self.forward_loss(batch)], [micro_weights],
                                  last=i == len(micro_batches) - 1)
        elif self.ctx.sharded:  # whole local gradients reduce-scattered into FSDP's shards, a bucket at a time
            self.capture.apply_weights(list(weights), ShardedGradientReducer())
        else:
            self.capture.apply_weights(list(weights))
            all_reduce_gradients(self.ctx.dist, list(self.ctx.model.parameters()))
        return StepResult(loss, metrics=metrics, weights=out.sample_weights)
