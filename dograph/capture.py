"""Hooks that project per-sample gradients in the ordinary backward and defer the weight gradients.

During a capturing forward/backward (docs/design.md sections 2.1, 2.5, 6):

* every parameter has ``requires_grad=False``, so autograd computes no weight gradient at
  all (only activation gradients); hooked module outputs are made to require grad so the
  backward still flows;
* a forward hook on each module that owns parameters keeps its inputs; a tensor hook on
  its output receives the output-grad ``Delta`` (per sample, since the backward is of
  ``sum_i l_i``);
* for projected layers the hook writes ``(Delta_i R)^T (A_i S)`` into the step's
  projection buffer (no host synchronisation inside hooks).

Once the mixer has weighed the samples (``v``), :meth:`GradientCapture.apply_weights` forms
every parameter's gradient ``sum_i v_i g_i`` from what the hooks kept: ``Delta^T diag(v) A``
for Linear/Conv1D weights (the matmul autograd skipped: no second backward), and for the
small modules (norms, embeddings) a local re-forward whose vjp takes ``v``-scaled
output-grads. The two-pass reference keeps nothing and backpropagates ``sum_i v_i l_i``
again instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from dograph.errors import ConfigError
from dograph.projection import BoundProjection, LayerProjection, is_linear
from dograph.timing import StepTimer


@dataclass
class _Call:
    """One call of a hooked module during a capturing backward."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_grad: Tensor | None = None


@dataclass
class _Hooked:
    name: str
    module: nn.Module
    projection: LayerProjection | None
    calls: list[_Call] = field(default_factory=list)


class GradientCapture:
    """Owns the hooks of one model; inactive (a cheap flag check) outside :meth:`capturing`."""

    def __init__(self, model: nn.Module, projection: BoundProjection, *, keep_for_update: bool) -> None:
        self.model, self.projection, self.keep_for_update = model, projection, keep_for_update
        self.device = next(model.parameters()).device
        by_module = {id(layer.module): layer for layer in projection.layers}
        self.hooked = [_Hooked(name, module, by_module.get(id(module)))
                       for name, module in model.named_modules() if any(True for _ in module.parameters(False))]
        self._check_supported()
        self.active, self.batch_size = False, 0
        self.non_tensor_outputs: set[str] = set()  # hooked modules whose output the hooks cannot follow
        self.micro: list[list[list[_Call]]] = []  # per micro-batch, per hooked module: its calls
        self.blocks: Tensor | None = None
        self.timer = StepTimer(self.device)
        self.handles: list[RemovableHandle] = [
            h.module.register_forward_hook(self._forward_hook(h), with_kwargs=True) for h in self.hooked]

    def _check_supported(self) -> None:
        if not self.keep_for_update:
            return
        for h in self.hooked:
            if is_linear(h.module):
                continue
            if any(True for _ in h.module.children()) and any(True for _ in h.module.parameters(False)):
                raise ConfigError(f"the one-backward weighted update cannot handle module {h.name} "
                                  f"({type(h.module).__name__}): use trainer.weighted_update=two_pass")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # ---- the capturing forward/backward ----------------------------------------------------
    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Hooks on, parameter gradients off, for the forward and backward of the step's micro-batches."""
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        self.active, self.micro, self.timer = True, [], StepTimer(self.device)
        try:
            yield
        finally:
            self.active = False
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def start_micro_batch(self, batch_size: int) -> None:
        self.batch_size = batch_size
        for h in self.hooked:
            h.calls = []
        self.blocks = torch.zeros(batch_size, self.projection.blocks_dim, device=self.device,
                                  dtype=self.projection.layers[0].left.dtype)

    def end_micro_batch(self) -> Tensor:
        """[b, k] projected gradients of the micro-batch just backpropagated."""
        if self.keep_for_update:
            self.micro.append([h.calls for h in self.hooked])
        for h in self.hooked:
            h.calls = []
        with self.timer.measure():
            projected = self.projection.finish(self.blocks)
        self.blocks = None
        return projected

    def _forward_hook(self, hooked: _Hooked):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.active:
                return None
            if not isinstance(output, Tensor):
                self.non_tensor_outputs.add(hooked.name)
                return None
            call = _Call(tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)
            hooked.calls.append(call)
            if not output.requires_grad:  # a first layer: its inputs carry no grad, params are frozen
                output.requires_grad_(True)
            if output.ndim > 0 and output.shape[0] == 1 and self.batch_size > 1:
                # broadcast over the batch downstream (GPT-2's position embedding): expand it so
                # the output-grad keeps one row per sample instead of their sum
                output = output.expand(self.batch_size, *output.shape[1:])
            output.register_hook(self._grad_hook(hooked, call))
            return output

        return hook

    def _grad_hook(self, hooked: _Hooked, call: _Call):
        def hook(grad: Tensor) -> None:
            if hooked.projection is not None:
                with self.timer.measure():
                    layer = hooked.projection
                    self.blocks[:, layer.offset:layer.offset + layer.right.shape[1] ** 2] += layer.project(
                        call.args[0], grad)
            if self.keep_for_update:
                call.output_grad = grad
            else:
                call.args, call.kwargs = (), {}

        return hook

    # ---- the deferred weighted gradient ---------------------------------------------------------
    def apply_weights(self, weights: list[Tensor]) -> None:
        """Add ``sum_i v_i g_i`` to every parameter's ``.grad``; ``weights[j]`` is micro-batch j's [b]."""
        if len(weights) != len(self.micro):
            raise RuntimeError(f"{len(weights)} weight vectors for {len(self.micro)} captured micro-batches")
        for micro_calls, v in zip(self.micro, weights, strict=True):
            for hooked, calls in zip(self.hooked, micro_calls, strict=True):
                for call in calls:
                    if call.output_grad is None:  # the module's output did not reach the loss
                        continue
                    if is_linear(hooked.module):
                        _linear_grads(hooked.module, call.args[0], call.output_grad, v)
                    else:
                        scale = v.to(call.output_grad.dtype).view(-1, *([1] * (call.output_grad.ndim - 1)))
                        _module_grads(hooked.module, call, call.output_grad * scale)
        self.micro = []
        self._check_every_gradient()

    def _check_every_gradient(self) -> None:
        """Stop, naming them, if trainable parameters got no gradient (never lose one silently)."""
        missing = [name for name, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if not missing:
            return
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        cause = (f"; modules whose output is not a Tensor: {', '.join(sorted(self.non_tensor_outputs))}"
                 if self.non_tensor_outputs else "")
        raise ConfigError(f"the one-backward weighted update formed no gradient for {shown}{cause}: "
                          "use trainer.weighted_update=two_pass, or freeze those parameters")


def _accumulate(param: nn.Parameter, value: Tensor) -> None:
    value = value.to(param.dtype)
    param.grad = value if param.grad is None else param.grad + value


def _linear_grads(module: nn.Module, inputs: Tensor, output_grad: Tensor, v: Tensor) -> None:
    """Weight (and bias) gradient ``Delta^T diag(v) A`` of a Linear/Conv1D.

    ``v`` scales whichever side is narrower (the inputs of the output head rather than its
    vocabulary-wide output-grads), so the weighting costs one pass over the smaller tensor.
    """
    d = output_grad.reshape(-1, output_grad.shape[-1])  # [N, d_out]
    a = inputs.reshape(-1, inputs.shape[-1]).to(d.dtype)  # [N, d_in]
    per_row = v.to(d.dtype).repeat_interleave(d.shape[0] // v.shape[0]).unsqueeze(1)  # [N, 1]
    if a.shape[1] <= d.shape[1]:
        a, d_weighted = a * per_row, d
    else:
        d_weighted = d * per_row
    weight_grad = a.t() @ d_weighted if isinstance(module, Conv1D) else d_weighted.t() @ a
    _accumulate(module.weight, weight_grad)
    if module.bias is not None:
        _accumulate(module.bias, (per_row.t() @ d).squeeze(0))


def _module_grads(module: nn.Module, call: _Call, scaled_grad: Tensor) -> None:
    """Gradients of a small module's own parameters by a local re-forward and vjp."""
    params = list(module.parameters(False))
    flags = [p.requires_grad for p in params]  # restored exactly afterwards (a frozen one stays frozen)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            output = module(*call.args, **call.kwargs)
            if output.shape != scaled_grad.shape:  # an output the forward hook expanded over the batch
                scaled_grad = scaled_grad.sum(0, keepdim=True)
            grads = torch.autograd.grad(output, params, grad_outputs=scaled_grad.to(output.dtype),
                                        allow_unused=True)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
    grads = [g if flag else None for g, flag in zip(grads, flags, strict=True)]
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            _accumulate(p, g)
