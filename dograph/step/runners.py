"""How one optimizer step turns micro-batches into gradients, given what the mixer needs.

The trainer picks one runner from the mixer's declared needs (never its name;
:func:`dograph.step.build.build_step_runner`):

* :class:`PlainStep`: the mixer never reweights (uniform, static mixtures). Each
  micro-batch is forward/backward'ed at once with weight 1/B, under DDP when distributed.
  No mixer code runs.
* :class:`ReweightStep`: the mixer reweights from cheap signals (losses, domains). All
  micro-batches are forwarded first (their graphs kept), the mixer weighs the whole step,
  then each weighted loss is backpropagated. Gradients are summed over ranks explicitly
  (under FSDP2, by FSDP's reduce-scatter: :func:`backward_weighted`).
* :class:`dograph.step.projected.ProjectedStep`: the mixer reads gradient signals, projected
  per-sample gradients (``GRAD_PROJ``) or the Gram of the per-domain gradients
  (``DOMAIN_GRAM``); one capturing backward, then the weighted update from what it kept.

Sample weights ``v`` sum to 1 over the global batch, so the step's gradient is
``sum_i v_i grad(l_i)`` summed over micro-batches and ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dograph.data.sampler import Batch
from dograph.distributed import DistContext, all_reduce_gradients
from dograph.mixing import Mixer, MixerOutput, Signal, StepSignals
from dograph.models import per_sample_loss, per_token_loss


@dataclass
class StepResult:
    loss: Tensor  # [b] detached per-sample losses of this rank (all micro-batches)
    skipped: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    weights: Tensor | None = None  # [b] the sample weights applied (None: the plain mean 1/B)


@dataclass
class StepContext:
    """What every runner needs; built once by the trainer."""

    model: nn.Module  # the bare model
    mixer: Mixer
    dist: DistContext
    global_batch: int  # sequences per optimizer step over all ranks and micro-batches
    autocast: Callable[[], AbstractContextManager]
    lr_at: Callable[[int], float] = lambda step: 0.0  # the learning rate of a step (the schedule)
    num_domains: int = 1  # human domains of the corpus
    sharded: bool = False  # FSDP2 (``dograph.parallel.shard_model``): FSDP reduces gradients during backward


def gradient_sync(ctx: StepContext, model: nn.Module, last: bool) -> AbstractContextManager:
    """Reduce gradients over ranks only in the backward of the step's last micro-batch.

    DDP: ``no_sync()`` before the last; FSDP2: ``set_requires_gradient_sync(False)`` (gradients stay
    unsharded and accumulate locally, then the last backward reduce-scatters their sum: torch docs,
    ``FSDPModule.set_requires_gradient_sync``).
    """
    if last or not ctx.dist.enabled:
        return nullcontext()
    if ctx.sharded:
        return _fsdp_no_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


@contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class StepRunner(ABC):
    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def forward_loss(self, batch: Batch) -> Tensor:
        with self.ctx.autocast():
            return per_sample_loss(self.ctx.model, batch.input_ids, batch.targets)

    def forward_token_loss(self, batch: Batch) -> Tensor:
        """[b, T] per-token losses (with the graph), for mixers that read TOKEN_LOSS."""
        with self.ctx.autocast():
            return per_token_loss(self.ctx.model, batch.input_ids, batch.targets)

    @abstractmethod
    def run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        """Leave the step's gradient in ``.grad`` (summed over ranks) unless skipped."""


class PlainStep(StepRunner):
    """Every sample weighs 1/B; DDP or FSDP (when distributed) averages gradients during backward."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self.ddp_model: nn.Module | None = None
        if ctx.dist.enabled and not ctx.sharded:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.dist.device.index] if ctx.dist.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(ctx.model, device_ids=device_ids)

    def run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        # DDP and FSDP average over ranks, so each rank scales by world / B to get sum_i (1/B) grad l_i.
        scale = self.ctx.dist.world_size / self.ctx.global_batch
        model = self.ddp_model or self.ctx.model
        losses = []
        for i, batch in enumerate(micro_batches):
            with gradient_sync(self.ctx, model, i == len(micro_batches) - 1):  # forward and backward inside
                with self.ctx.autocast():
                    loss = per_sample_loss(model, batch.input_ids, batch.targets)
                (loss.sum() * scale).backward()
            losses.append(loss.detach())
        return StepResult(torch.cat(losses))


def step_signals(ctx: StepContext, step: int, micro_batches: list[Batch], loss: Tensor, **measured: Any
                 ) -> StepSignals:
    """The signals of the whole step (micro-batches concatenated), as the mixer declared.

    ``measured``: the costly signals the runner computed (``grad_proj``, ``token_loss``,
    ``domain_gram``, ``domain_counts``).
    """
    requires = ctx.mixer.requires
    domain = torch.cat([b.domain for b in micro_batches]) if Signal.DOMAIN in requires else None
    targets = torch.cat([b.targets for b in micro_batches]) if Signal.TOKEN_LOSS in requires else None
    return StepSignals(step=step, input_ids=torch.cat([b.input_ids for b in micro_batches]), loss=loss,
                       domain=domain, lr=ctx.lr_at(step), targets=targets, **measured)


def resolve_weights(ctx: StepContext, out: MixerOutput, loss: Tensor) -> Tensor:
    if out.sample_weights is None:
        return torch.full_like(loss, 1.0 / ctx.global_batch)
    return out.sample_weights.to(loss.dtype)


class ReweightStep(StepRunner):
    """Forward all micro-batches, let the mixer weigh the step, then backpropagate the weighted losses."""

    def run(self, step: int, micro_batches: list[Batch]) -> StepResult:
        measured = {}
        if Signal.TOKEN_LOSS in self.ctx.mixer.requires:
            token_losses = [self.forward_token_loss(batch) for batch in micro_batches]
            losses = [t.mean(dim=1) for t in token_losses]
            measured["token_loss"] = torch.cat([t.detach() for t in token_losses])
        else:
            losses = [self.forward_loss(batch) for batch in micro_batches]
        loss = torch.cat([l.detach() for l in losses])
        out = self.ctx.mixer.weigh(step_signals(self.ctx, step, micro_batches, loss, **measured))
        if out.skip_step:
            return StepResult(loss, skipped=True, metrics=out.metrics)
        weights = resolve_weights(self.ctx, out, loss).split([len(l) for l in losses])
        backward_weighted(self.ctx, losses, weights)
        return StepResult(loss, metrics=out.metrics, weights=out.sample_weights)


def backward_weighted(ctx: StepContext, losses: list[Tensor], weights: list[Tensor] | tuple[Tensor, ...], *,
                      last: bool = True) -> None:
    """Backpropagate each micro-batch's ``sum_i v_i l_i`` and leave the SUM over ranks in ``.grad``.

    Unsharded: local backwards, then one explicit all-reduce (sum). Sharded (FSDP2): FSDP
    reduce-scatters in the last backward and averages over ranks, so the losses are scaled by
    the world size (a power of two in practice: exact in floating point) and nothing is
    all-reduced by hand (the gradients are sharded DTensors). ``last=False``: more micro-batches
    of the step follow (a caller that backpropagates them one call at a time); nothing is reduced yet.
    """
    scale = ctx.dist.world_size if ctx.sharded else 1
    for i, (micro_loss, micro_weights) in enumerate(zip(losses, weights, strict=True)):
        with gradient_sync(ctx, ctx.model, last and i == len(losses) - 1):
            ((micro_loss * micro_weights).sum() * scale).backward()
    if last and not ctx.sharded:
        all_reduce_gradients(ctx.dist, list(ctx.model.parameters()))

