"""Projected per-sample gradients (docs/design.md section 2.1).

For a linear layer with weight gradient ``G_i = sum_t delta_t a_t^T`` (output-grads
``Delta_i`` [T, d_out], inputs ``A_i`` [T, d_in]), the Kronecker-factored Gaussian
projection is ``R^T G_i S = (Delta_i R)^T (A_i S)`` with ``R`` [d_out, r], ``S`` [d_in, r],
entries N(0, 1/r). It never forms ``G_i``: two thin matmuls per layer and a [r, r]
contraction per sample. Since E[R R^T] = I and E[S S^T] = I, inner products are
unbiased: E<proj(G), proj(G')> = <G, G'>. Blocks of all projected layers are concatenated
and optionally compressed by one dense Gaussian [L r^2, k] with entries N(0, 1/k).

The random matrices come from a CPU generator seeded by (seed, layer index), so they are
identical on every rank, on every device and after resume.

:func:`exact_per_sample_grads` and :class:`DenseReferenceProjector` are the reference
(torch.func per-sample gradients, then a dense Gaussian): for tests and small models only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from transformers.pytorch_utils import Conv1D

from dograph.errors import ConfigError
from dograph.models import per_sample_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or of GPT-2's Conv1D (which stores its weight transposed)."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    return module.out_features, module.in_features


def select_layers(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Linear/Conv1D modules whose qualified name matches an ``include`` and no ``exclude`` pattern."""
    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p)
                   for p in patterns)

    return [(name, module) for name, module in model.named_modules()
            if is_linear(module) and matches(name, include) and not matches(name, exclude)]


def gaussian(rows: int, cols: int, std: float, seed: int) -> Tensor:
    """A float32 N(0, std^2) matrix from a CPU generator (device-independent values)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * std


def layer_seed(seed: int, index: int, side: int) -> int:
    return (seed * 1_000_003 + index * 7919 + side) % (2**63 - 1)


@dataclass
class LayerProjection:
    """The two sketch matrices of one projected layer and its slot in the concatenated vector."""

    name: str
    module: nn.Module
    right: Tensor  # R [d_out, r], applied to output-grads
    left: Tensor  # S [d_in, r], applied to inputs
    offset: int

    def project(self, inputs: Tensor, output_grads: Tensor) -> Tensor:
        """[B, r*r] blocks ``(Delta_i R)^T (A_i S)`` from inputs [B, T, d_in] and output-grads [B, T, d_out]."""
        return self.combine(self.project_inputs(inputs), output_grads)

    def project_inputs(self, inputs: Tensor) -> Tensor:
        """``A_i S`` [B, T, r]: computed in the forward hook, while the inputs are still in cache."""
        return inputs.to(self.left.dtype) @ self.left

    def combine(self, projected_inputs: Tensor, output_grads: Tensor) -> Tensor:
        """[B, r*r] blocks ``(Delta_i R)^T (A_i S)`` from :meth:`project_inputs` and output-grads [B, T, d_out]."""
        d_r = output_grads.to(self.right.dtype) @ self.right  # [B, T, r]
        return torch.einsum("btr,bts->brs", d_r, projected_inputs).flatten(1)


class KroneckerProjector:
    """Configuration of the projection; :meth:`bind` makes the matrices for a model.

    ``include``/``exclude``: module-name patterns (fnmatch on the qualified or last name).
    Our choice: every Linear/Conv1D except the output head (``lm_head``), which GPT-2 ties
    to the token embedding (embeddings are excluded by docs/design.md section 2.1) and whose 50k outputs
    would dominate the cost. ``out_dim=None`` keeps the concatenated L*r^2 blocks.
    """

    def __init__(self, *, rank: int = 16, out_dim: int | None = 1024, include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = ("lm_head",), dtype: str = "float32", seed: int = 0) -> None:
        if rank < 1:
            raise ConfigError(f"mixer.projection.rank must be >= 1 (got {rank})")
        if out_dim is not None and out_dim < 1:
            raise ConfigError(f"mixer.projection.out_dim must be >= 1 or null (got {out_dim})")
        if dtype not in DTYPES:
            raise ConfigError(f"mixer.projection.dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
        self.rank, self.out_dim, self.seed = rank, out_dim, seed
        self.include, self.exclude, self.dtype = list(include), list(exclude), DTYPES[dtype]

    def bind(self, model: nn.Module) -> BoundProjection:
        layers = select_layers(model, self.include, self.exclude)
        if not layers:
            raise ConfigError(f"mixer.projection selects no Linear layer (include={self.include}, "
                              f"exclude={self.exclude})")
        device = next(model.parameters()).device
        r, bound = self.rank, []
        for index, (name, module) in enumerate(layers):
            d_out, d_in = linear_shape(module)
            right = gaussian(d_out, r, r**-0.5, layer_seed(self.seed, index, 0))
            left = gaussian(d_in, r, r**-0.5, layer_seed(self.seed, index, 1))
            bound.append(LayerProjection(name, module, right.to(device, self.dtype), left.to(device, self.dtype),
                                         index * r * r))
        blocks = len(layers) * r * r
        compress = None
        if self.out_dim is not None:
            compress = gaussian(blocks, self.out_dim, self.out_dim**-0.5, layer_seed(self.seed, len(layers), 2))
            compress = compress.to(device, self.dtype)
        return BoundProjection(bound, compress, blocks)


@dataclass
class BoundProjection:
    layers: list[LayerProjection]
    compress: Tensor | None  # [L r^2, k] or None
    blocks_dim: int

    @property
    def dim(self) -> int:
        return self.blocks_dim if self.compress is None else self.compress.shape[1]

    def finish(self, blocks: Tensor) -> Tensor:
        """[B, k] projected gradients from the concatenated [B, L r^2] layer blocks."""
        return blocks if self.compress is None else blocks @ self.compress


def exact_per_sample_grads(model: nn.Module, input_ids: Tensor, targets: Tensor, names: Sequence[str],
                           chunk: int = 8) -> dict[str, Tensor]:
    """Exact per-sample gradients {param name: [B, *shape]} of the mean-token loss (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = list(names)

    def loss_of(selected: dict[str, Tensor], ids: Tensor, tgt: Tensor) -> Tensor:
        merged = {**params, **selected}
        return functional_call(model, merged, (ids.unsqueeze(0), tgt.unsqueeze(0))).squeeze(0)

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    parts = [per_sample({n: params[n] for n in wanted}, input_ids[i:i + chunk], targets[i:i + chunk])
             for i in range(0, len(input_ids), chunk)]
    return {n: torch.cat([p[n] for p in parts]) for n in wanted}


class LossModule(nn.Module):
    """``model`` as a function (input_ids, targets) -> [B] per-sample losses, for torch.func."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        return per_sample_loss(self.model, input_ids, targets)


class DenseReferenceProjector:
    """Exact per-sample gradients of the selected layers times a dense Gaussian [P, k] (reference).

    The Gaussian is drawn on the gradients' device in row chunks from per-chunk seeds (so
    its values depend on the device) and kept between calls while it fits in
    ``cache_bytes``; beyond that (GPT-2 Small: P x k is about 700 GB) it is drawn anew each
    call. Memory is O(B x P) for the per-sample gradients: small models only.
    """

    def __init__(self, *, out_dim: int = 1024, seed: int = 0, row_chunk: int = 1 << 16,
                 cache_bytes: int = 1 << 30) -> None:
        self.out_dim, self.seed, self.row_chunk, self.cache_bytes = out_dim, seed, row_chunk, cache_bytes
        self._cache: dict[tuple[int, int, str], Tensor] = {}

    def _block(self, index: int, start: int, rows: int, device: torch.device) -> Tensor:
        key = (index, start, str(device))
        if key in self._cache:
            return self._cache[key]
        generator = torch.Generator(device=device).manual_seed(layer_seed(self.seed, index, start + 3))
        block = torch.randn(rows, self.out_dim, generator=generator, device=device) * self.out_dim**-0.5
        cached = sum(b.numel() * 4 for b in self._cache.values())
        if cached + block.numel() * 4 <= self.cache_bytes:
            self._cache[key] = block
        return block

    def project(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]], input_ids: Tensor,
                targets: Tensor) -> Tensor:
        wrapped = LossModule(model)
        names = [f"model.{n}.weight" for n, _ in layers]
        grads = exact_per_sample_grads(wrapped, input_ids, targets, names)
        out = torch.zeros(len(input_ids), self.out_dim, device=input_ids.device)
        for index, name in enumerate(names):
            flat = grads[name].flatten(1).float()
            for start in range(0, flat.shape[1], self.row_chunk):
                rows = min(self.row_chunk, flat.shape[1] - start)
                out += flat[:, start:start + rows] @ self._block(index, start, rows, flat.device)
        return out
