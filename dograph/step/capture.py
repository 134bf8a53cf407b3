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

Parameters are finished one after another (:meth:`GradientCapture._per_parameter`), so under
FSDP2 each whole gradient can be reduce-scattered into its shards as soon as it is complete
(``apply_weights(..., reducer)``, :class:`dograph.parallel.ShardedGradientReducer`); the small
modules' re-forwards then all-gather their own parameters, in the dtype the forward used.

:meth:`GradientCapture.weighted_gram` uses the same kept tensors for the Gram matrix of
``D`` weighted gradients ``G_d = sum_i W[d, i] g_i`` (DoGE's per-domain gradients): one
parameter at a time it forms the ``[D, *shape]`` stack of that parameter's ``G_d``, adds its
``D x D`` inner products and drops it, so the extra memory is ``D`` x the largest parameter,
never ``D`` x all parameters. Without a projection (``projection=None``) the hooks keep
inputs and output-grads only (no projected blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from dograph.distributed import DistContext, all_reduce_sum
from dograph.errors import ConfigError
from dograph.parallel import ShardedGradientReducer, is_recomputing, unsharded
from dograph.step.projection import BoundProjection, LayerProjection, is_linear
from dograph.step.timing import StepTimer

GRAM_CHUNK = 1 << 20  # weighted_gram: columns per all-reduce bucket
GRAM_BLOCK = 4096  # columns per float32 partial inner product (summed in float64: error ~1e-8 relative)


@dataclass
class _Call:
    """One call of a hooked module during a capturing backward."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_grad: Tensor | None = None
    projected_input: Tensor | None = None  # ``A S`` of a projected layer, formed in the forward hook


@dataclass
class _Support:
    """Which samples each of the D weighted gradients of one micro-batch reads.

    ``rows[d]``: the samples with ``W[d, i] != 0``; ``index``: all of them, domain after domain
    (``bounds[d]:bounds[d + 1]`` are domain d's), so a layer gathers its rows once for all D;
    ``scale``: ``W[d, i]`` of those rows; ``contiguous``: ``index`` is ``0 .. b - 1`` (samples in
    domain order, each in one support), so no gather at all.
    """

    rows: list[Tensor]
    index: Tensor
    scale: Tensor
    bounds: list[int]
    contiguous: bool

    @classmethod
    def of(cls, w: Tensor, mask: Tensor) -> _Support:
        rows = [mask[d].nonzero().squeeze(1) for d in range(w.shape[0])]
        bounds = [0]
        for r in rows:
            bounds.append(bounds[-1] + len(r))
        domain = torch.cat([torch.full((len(r),), d, dtype=torch.long) for d, r in enumerate(rows)])
        contiguous = torch.equal(torch.cat(rows), torch.arange(w.shape[1]))
        rows = [r.to(w.device) for r in rows]
        index = torch.cat(rows)
        return cls(rows, index, w[domain.to(w.device), index].float(), bounds, contiguous)


@dataclass
class _Hooked:
    name: str
    module: nn.Module
    projection: LayerProjection | None
    calls: list[_Call] = field(default_factory=list)
    param_dtypes: dict[str, torch.dtype] | None = None  # its own parameters' dtypes as its forward saw them


class GradientCapture:
    """Owns the hooks of one model; inactive (a cheap flag check) outside :meth:`capturing`."""

    def __init__(self, model: nn.Module, projection: BoundProjection | None, *, keep_for_update: bool) -> None:
        self.model, self.projection, self.keep_for_update = model, projection, keep_for_update
        self.device = next(model.parameters()).device
        by_module = {id(layer.module): layer for layer in projection.layers} if projection is not None else {}
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
        if self.projection is None:
            self.blocks = None
            return
        self.blocks = torch.zeros(batch_size, self.projection.blocks_dim, device=self.device,
                                  dtype=self.projection.layers[0].left.dtype)

    def end_micro_batch(self) -> Tensor | None:
        """[b, k] projected gradients of the micro-batch just backpropagated (None without a projection)."""
        if self.keep_for_update:
            self.micro.append([h.calls for h in self.hooked])
        for h in self.hooked:
            h.calls = []
        if self.projection is None:
            return None
        with self.timer.measure():
            projected = self.projection.finish(self.blocks)
        self.blocks = None
        return projected

    def _forward_hook(self, hooked: _Hooked):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.active or is_recomputing():  # activation checkpointing re-runs a block: seen once already
                return None
            if not isinstance(output, Tensor):
                self.non_tensor_outputs.add(hooked.name)
                return None
            call = _Call(tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)
            if hooked.projection is not None:  # A S now, while the inputs are in cache (the same product later)
                # in the projection's dtype, as in the backward hook: not in the forward's autocast dtype
                with self.timer.measure(), torch.autocast(call.args[0].device.type, enabled=False):
                    call.projected_input = hooked.projection.project_inputs(call.args[0])
                if not self.keep_for_update:  # the inputs themselves are not needed again
                    call.args, call.kwargs = (), {}
            hooked.calls.append(call)
            if hooked.param_dtypes is None:  # FSDP's mixed precision: bf16 here, fp32 in the sharded master
                hooked.param_dtypes = {n: p.dtype for n, p in module.named_parameters(recurse=False)}
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
                    self.blocks[:, layer.offset:layer.offset + layer.right.shape[1] ** 2] += layer.combine(
                        call.projected_input, grad)
                call.projected_input = None
            if self.keep_for_update:
                call.output_grad = grad
            else:
                call.args, call.kwargs = (), {}

        return hook

    # ---- the deferred weighted gradient ---------------------------------------------------------
    def apply_weights(self, weights: list[Tensor], reducer: ShardedGradientReducer | None = None) -> None:
        """Add ``sum_i v_i g_i`` to every parameter's ``.grad``; ``weights[j]`` is micro-batch j's [b].

        Without ``reducer`` each parameter's local gradient goes to its ``.grad`` (the caller sums over
        ranks). Under FSDP (``reducer``) each parameter's whole local gradient is handed to it as soon as
        every module that uses it is done, and it reduce-scatters them into the sharded ``.grad``: at most
        one bucket of whole gradients is alive at a time, never the whole model's.
        """
        if len(weights) != len(self.micro):
            raise RuntimeError(f"{len(weights)} weight vectors for {len(self.micro)} captured micro-batches")

        def contributions(index: int, hooked: _Hooked) -> Iterator[tuple[nn.Parameter, Tensor]]:
            params = None  # the module's own parameters as its forward saw them, gathered once
            for micro_calls, v in zip(self.micro, weights, strict=True):
                for call in micro_calls[index]:
                    if call.output_grad is None:  # the module's output did not reach the loss
                        continue
                    if is_linear(hooked.module):
                        pairs = _linear_grads(hooked.module, call.args[0], call.output_grad, v)
                    else:
                        if params is None:
                            params = _forward_params(hooked)
                        scale = v.to(call.output_grad.dtype).view(-1, *([1] * (call.output_grad.ndim - 1)))
                        pairs = _module_grads(hooked.module, call, call.output_grad * scale, params)
                    yield from ((p, g.to(p.dtype)) for p, g in pairs)  # summed in the parameter's dtype

        missing = []
        for param, grad in self._per_parameter(contributions):
            if grad is None:
                missing.append(param)
                if reducer is not None:  # the same on every rank (the model's structure): stop before reducing
                    break
            elif reducer is not None:
                reducer.add(param, grad)
            else:
                param.grad = grad if param.grad is None else param.grad + grad
        if reducer is not None and not missing:
            reducer.flush()
        self.micro = []
        if missing:
            self._raise_missing(missing)

    def _raise_missing(self, params: list[nn.Parameter]) -> None:
        """Stop, naming them: trainable parameters that got no gradient (never lose one silently)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        missing = [names[id(p)] for p in params]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        cause = (f"; modules whose output is not a Tensor: {', '.join(sorted(self.non_tensor_outputs))}"
                 if self.non_tensor_outputs else "")
        raise ConfigError(f"the one-backward weighted update formed no gradient for {shown}{cause}: "
                          "use trainer.weighted_update=two_pass, or freeze those parameters")

    def _per_parameter(self, contributions: Callable[[int, _Hooked], Iterable[tuple[nn.Parameter, Tensor]]]
                       ) -> Iterator[tuple[nn.Parameter, Tensor | None]]:
        """Each trainable parameter once, with the sum of its modules' ``contributions`` (None: none here).

        The modules are visited so that parameters finish one after another (the modules sharing a
        tied parameter consecutively), in the model's order on every rank; a parameter is yielded as
        soon as every module that uses it is done, so its sum can be used and dropped at once.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]  # unique, in the model's order
        owners: dict[int, list[int]] = {id(p): [] for p in params}
        for index, hooked in enumerate(self.hooked):
            for p in hooked.module.parameters(False):
                if id(p) in owners:
                    owners[id(p)].append(index)
        order: list[int] = []
        for p in params:
            order.extend(i for i in owners[id(p)] if i not in order)
        remaining = {key: len(value) for key, value in owners.items()}
        pending: dict[int, Tensor] = {}
        for index in order:
            hooked = self.hooked[index]
            for p, value in contributions(index, hooked):
                # every contribution is a fresh tensor: summed in place
                pending[id(p)] = value if id(p) not in pending else pending[id(p)].add_(value)
            for p in hooked.module.parameters(False):
                if id(p) not in remaining:
                    continue
                remaining[id(p)] -= 1
                if remaining[id(p)] == 0:
                    yield p, pending.pop(id(p), None)

    # ---- the Gram of weighted gradients (DoGE) --------------------------------------------------
    def weighted_gram(self, weights: list[Tensor], dist: DistContext | None = None) -> Tensor:
        """``[D, D]`` float64 Gram ``<G_d, G_e>`` of ``G_d = sum_i W[d, i] g_i`` over the trainable parameters.

        ``weights[j]``: micro-batch j's ``[D, b_j]`` weight matrix. Computed from what the capturing
        backward kept (no second backward; the kept tensors stay for :meth:`apply_weights`). Per
        parameter (a tied parameter gathers every module that uses it) the ``[D, *shape]`` stack of
        its ``G_d`` is formed: Linear/Conv1D weights ``Delta_S^T diag(W[d, S]) A_S`` over the rows S of
        the samples with ``W[d, i] != 0`` (for disjoint supports, as per-domain means, the D products
        cost one weight-gradient matmul in all), biases ``W Delta``; small modules (norms, embeddings)
        one local re-forward and D vjps. Finished stacks go to buckets of about
        ``GRAM_CHUNK`` columns; under DDP each bucket is summed over ranks before its inner products
        (``dist``): the Gram of the *global* weighted gradients, for the communication of ``D``
        gradient all-reduces per step. One host copy (the support of ``W``); on the CPU about one
        weight-gradient pass of the model (``apply_weights`` is another).
        """
        if self.active:
            raise RuntimeError("weighted_gram needs the parameters' requires_grad flags: call it after capturing()")
        if len(weights) != len(self.micro):
            raise RuntimeError(f"{len(weights)} weight matrices for {len(self.micro)} captured micro-batches")
        dist = dist or DistContext()
        num = weights[0].shape[0]
        support_mask = torch.cat(weights, dim=1).ne(0).cpu()  # the one host synchronisation
        supports, start = [], 0
        for w in weights:
            supports.append(_Support.of(w, support_mask[:, start:start + w.shape[1]]))
            start += w.shape[1]
        gram = torch.zeros(num, num, dtype=torch.float64, device=self.device)
        bucket: list[Tensor] = []  # finished [D, n] stacks, reduced and multiplied together (fewer, larger ops)

        def flush() -> None:
            nonlocal gram
            if not bucket:
                return
            flat = all_reduce_sum(dist, bucket[0] if len(bucket) == 1 else torch.cat(bucket, dim=1))
            bucket.clear()
            gram += _gram_of(flat)

        def contributions(index: int, hooked: _Hooked) -> Iterator[tuple[nn.Parameter, Tensor]]:
            return self._domain_grads(index, hooked, weights, supports)

        for p, stack in self._per_parameter(contributions):  # every rank, same order
            if stack is None:  # no contribution on this rank
                stack = torch.zeros(num, p.numel(), dtype=torch.float32, device=self.device)
            bucket.append(stack.reshape(num, -1))
            if sum(b.shape[1] for b in bucket) >= GRAM_CHUNK:
                flush()
        flush()
        return gram

    def _domain_grads(self, index: int, hooked: _Hooked, weights: list[Tensor], supports: list[_Support]
                      ) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Float32 ``[D, *shape]`` stacks of this module's trainable parameters, one per call."""
        params = None  # the module's own parameters as its forward saw them, gathered once
        for micro_calls, w, support in zip(self.micro, weights, supports, strict=True):
            for call in micro_calls[index]:
                if call.output_grad is None:  # the module's output did not reach the loss
                    continue
                if is_linear(hooked.module):
                    yield from _linear_domain_grads(hooked.module, call.args[0], call.output_grad, w, support)
                    continue
                if params is None:
                    params = _forward_params(hooked)
                yield from _module_domain_grads(hooked.module, call, w, support, params)


def _forward_params(hooked: _Hooked) -> dict[str, Tensor]:
    """A module's own parameters by name, as its forward saw them, for a local re-forward.

    Whole (all-gathered from FSDP's shards: a collective, so every rank asks for the same modules in
    the same order), detached, in the dtype of the forward (FSDP's bf16 under mixed precision); the
    trainable ones require grad. The parameters' own ``requires_grad`` flags are never touched.
    """
    dtypes = hooked.param_dtypes or {}
    out = {}
    for name, p in hooked.module.named_parameters(recurse=False):
        whole = unsharded(p).detach()
        out[name] = whole.to(dtypes.get(name, whole.dtype)).requires_grad_(p.requires_grad)
    return out


def _linear_grads(module: nn.Module, inputs: Tensor, output_grad: Tensor, v: Tensor
                  ) -> list[tuple[nn.Parameter, Tensor]]:
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
    out = [(module.weight, a.t() @ d_weighted if isinstance(module, Conv1D) else d_weighted.t() @ a)]
    if module.bias is not None:
        out.append((module.bias, (per_row.t() @ d).squeeze(0)))
    return out


def _module_grads(module: nn.Module, call: _Call, scaled_grad: Tensor, params: dict[str, Tensor]
                  ) -> list[tuple[nn.Parameter, Tensor]]:
    """Gradients of a small module's trainable parameters by a local re-forward (``params``) and vjp."""
    trainable = [name for name, value in params.items() if value.requires_grad]
    if not trainable:
        return []
    with torch.enable_grad():
        output = torch.func.functional_call(module, params, call.args, call.kwargs)
        if output.shape != scaled_grad.shape:  # an output the forward hook expanded over the batch
            scaled_grad = scaled_grad.sum(0, keepdim=True)
        grads = torch.autograd.grad(output, [params[name] for name in trainable],
                                    grad_outputs=scaled_grad.to(output.dtype), allow_unused=True)
    own = dict(module.named_parameters(recurse=False))
    return [(own[name], g) for name, g in zip(trainable, grads, strict=True) if g is not None]


def _gram_of(flat: Tensor) -> Tensor:
    """``flat @ flat.T`` in float64 for a float32 ``[D, n]``: float32 products of 4096-column blocks, summed in float64.

    (A float32 product over a million columns is off by ~1e-4 relative; float64 throughout costs a
    float64 copy and is ~15x slower on CPU.)
    """
    num, n = flat.shape
    whole = n - n % GRAM_BLOCK
    out = torch.zeros(num, num, dtype=torch.float64, device=flat.device)
    if whole:
        blocks = flat[:, :whole].reshape(num, -1, GRAM_BLOCK).transpose(0, 1)  # [n / block, D, block]
        out += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0)
    if whole < n:
        rest = flat[:, whole:].double()
        out += rest @ rest.T
    return out


def _linear_domain_grads(module: nn.Module, inputs: Tensor, output_grad: Tensor, w: Tensor,
                         support: _Support) -> list[tuple[nn.Parameter, Tensor]]:
    """``[D, ...]`` weight (and bias) gradients ``Delta^T diag(W[d]) A`` of a Linear/Conv1D, float32.

    The rows of every domain's samples are gathered once (``support.index``) and ``W`` scales the
    narrower side, as in :func:`_linear_grads`; domain d's product reads its contiguous slice, so for
    disjoint supports (per-domain means) the D products cost one weight-gradient matmul in all.
    """
    b, num = w.shape[1], w.shape[0]
    d = output_grad.reshape(b, -1, output_grad.shape[-1]).float()  # [b, T, d_out]
    a = inputs.reshape(b, -1, inputs.shape[-1]).float()  # [b, T, d_in]
    out: list[tuple[nn.Parameter, Tensor]] = []
    if module.weight.requires_grad:
        a_s, d_s = (a, d) if support.contiguous else (a.index_select(0, support.index),
                                                       d.index_select(0, support.index))
        scale = support.scale.view(-1, 1, 1)
        if a.shape[-1] <= d.shape[-1]:
            a_s = a_s * scale
        else:
            d_s = d_s * scale
        a_s, d_s = a_s.reshape(-1, a.shape[-1]), d_s.reshape(-1, d.shape[-1])
        per_sample = a.shape[1]  # rows of one sample
        stack = torch.empty(num, *module.weight.shape, dtype=torch.float32, device=d.device)
        for k in range(num):
            lo, hi = support.bounds[k] * per_sample, support.bounds[k + 1] * per_sample
            if lo == hi:
                stack[k].zero_()
            elif isinstance(module, Conv1D):
                torch.mm(a_s[lo:hi].t(), d_s[lo:hi], out=stack[k])
            else:
                torch.mm(d_s[lo:hi].t(), a_s[lo:hi], out=stack[k])
        out.append((module.weight, stack))
    if module.bias is not None and module.bias.requires_grad:
        out.append((module.bias, w.float() @ d.sum(1)))  # [D, b] @ [b, d_out]
    return out


def _module_domain_grads(module: nn.Module, call: _Call, w: Tensor, support: _Support, params: dict[str, Tensor]
                         ) -> list[tuple[nn.Parameter, Tensor]]:
    """``[D, ...]`` gradients of a small module's trainable parameters: one local re-forward, one vjp per domain.

    Domain d's vjp takes the ``W[d]``-scaled output-grads (zero outside its samples). Norms and
    embeddings are light, so D full-batch vjps cost little and keep the operations few. ``params``:
    :func:`_forward_params` (outside ``capturing()`` the trainable ones require grad).
    """
    trainable = [name for name, value in params.items() if value.requires_grad]
    if not trainable:
        return []
    inputs = [params[name] for name in trainable]
    num, grad = w.shape[0], call.output_grad
    stacks = [torch.empty(num, *t.shape, dtype=torch.float32, device=t.device) for t in inputs]
    with torch.enable_grad():
        output = torch.func.functional_call(module, params, call.args, call.kwargs)
        for k in range(num):
            if support.rows[k].numel() == 0:
                for stack in stacks:
                    stack[k].zero_()
                continue
            scaled = grad * w[k].to(grad.dtype).view(-1, *([1] * (grad.ndim - 1)))
            if output.shape != scaled.shape:  # an output the forward hook expanded over the batch
                scaled = scaled.sum(0, keepdim=True)
            grads = torch.autograd.grad(output, inputs, grad_outputs=scaled.to(output.dtype), retain_graph=True,
                                        allow_unused=True)
            for stack, g in zip(stacks, grads, strict=True):
                if g is None:
                    stack[k].zero_()
                else:
                    stack[k] = g
    own = dict(module.named_parameters(recurse=False))
    return [(own[name], stack) for name, stack in zip(trainable, stacks, strict=True)]
