"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``trainer.parallelism=fsdp``, and activation checkpointing.

Sharding follows the FSDP2 recipe of the torch docs (``fully_shard``: "apply to each
transformer block, then to the root"): each block is one communication group (its parameters
are all-gathered before its forward and reduce-scattered after its backward), the root group
holds the embeddings, final norm and head. Every parameter becomes a ``DTensor`` sharded on
dim 0 (``Shard(0)``, the last ranks padded when the dim does not divide the world size);
``state_dict`` keys (FQNs) do not change.

Activation checkpointing re-runs each block's forward in the backward instead of keeping its
activations (``torch.utils.checkpoint``, non-reentrant, as the torch docs recommend). It
replaces the block's ``forward`` (not the module), so parameter names, hooks on the block and
the HF export stay as they are; FSDP's hooks (on ``__call__``) stay outside the checkpointed
region. While a block is recomputed, :func:`is_recomputing` is true, so the gradient-capture
hooks (``dograph.step.capture``) do not record a layer a second time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dograph.config import ModelConfig
from dograph.distributed import DistContext, barrier

_RECOMPUTING = [0]  # depth of active recomputations (a list: mutable module state without `global`)


def is_recomputing() -> bool:
    """True while activation checkpointing re-runs a block's forward during the backward."""
    return _RECOMPUTING[0] > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


def _context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint.checkpoint(context_fn=...)``: (the first forward's context, the recompute's)."""
    return contextlib.nullcontext(), _recomputing()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the largest ``ModuleList`` of same-class modules.

    GPT-2 keeps them in ``transformer.h``, LLaMA in ``model.layers``; found generically so a new
    family needs no entry here.
    """
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(child) for child in m}) == 1]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def checkpoint_blocks(model: nn.Module) -> int:
    """Checkpoint every block's activations (recomputed in the backward); returns how many blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = transformer_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)

        block.forward = functools.wraps(inner)(forward)
    return len(blocks)


def shard_model(model: nn.Module, dist: DistContext, mixed_precision: bool) -> nn.Module:
    """``fully_shard`` each block, then the root (in place; returns the model).

    ``mixed_precision``: all-gather parameters in bf16 and reduce gradients in fp32
    (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``, the torch docs'
    example); the sharded master weights and the optimizer stay fp32. Off on the CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to the model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def per_rank_parameter_bytes(model: nn.Module, world_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of parameters one rank holds under FSDP2 with ``world_size`` ranks, from shapes alone.

    FSDP2 shards every parameter on dim 0 in ``ceil(dim0 / world)``-row chunks (``torch.chunk``
    semantics, the sharded storage padded to that size: torch docs, ``fully_shard``), so each rank
    holds ``ceil(dim0 / world) * prod(rest)`` elements of each parameter. Tied parameters count once.
    Works on a model built on ``torch.device("meta")`` (no memory).
    """
    size = torch.empty((), dtype=dtype).element_size()
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(math.ceil(p.shape[0] / world_size) * math.prod(p.shape[1:]) * size if p.ndim else size
               for p in unique)


def per_rank_parameter_bytes_of(cfg: ModelConfig, vocab_size: int, world_size: int,
                                dtype: torch.dtype = torch.float32) -> int:
    """:func:`per_rank_parameter_bytes` of the configured shape, built on the meta device (nothing allocated)."""
    from dograph.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    return per_rank_parameter_bytes(model, world_size, dtype)


def full_model_state_dict(model: nn.Module) -> dict[str, Any]:
    """The unsharded model state on rank 0 (CPU; empty on the others): what the HF export saves. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, dist: DistContext) -> None:
    """Each rank writes its own shards of the model and optimizer state into ``directory`` (a collective).

    ``torch.distributed.checkpoint.save`` (DCP) of the sharded state dicts (``get_state_dict``, torch
    docs): no rank gathers the whole model. Atomic as the other checkpoints: written into a temporary
    directory, renamed by rank 0 once every rank has finished. Several nodes need a shared filesystem.
    ``directory`` must be new (``dograph.train.checkpoint.fresh_shards_dir``): an existing one may be what
    ``latest`` names, and is removed only once a newer checkpoint names other shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if directory.exists():  # every rank sees it (a shared filesystem): all fail alike, before any collective
        raise FileExistsError(f"{directory} exists: shards are written under a fresh name (fresh_shards_dir)")
    tmp = directory.with_name(f".{directory.name}.tmp")
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    barrier(dist)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    barrier(dist)
    if dist.is_main:
        tmp.replace(directory)
    barrier(dist)


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Read what :func:`save_sharded_state` wrote into the sharded model and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def unsharded(param: Tensor) -> Tensor:
    """The whole parameter: all-gathered from its shards if it is a ``DTensor`` (a collective), else itself."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


class ShardedGradientReducer:
    """Sums full-shape gradients formed outside autograd over ranks into FSDP2's sharded ``.grad`` (in buckets).

    DoGraph's one-backward update forms each weight gradient ``Delta^T diag(v) A`` whole, from what the
    capture kept; FSDP's own reduce-scatter never sees it. This does what FSDP does after a backward:
    each gradient, cast to the parameter's dtype (FSDP2's fp32 ``reduce_dtype``), padded on dim 0 to
    ``ceil(dim0 / world) * world`` rows and cut into ``world`` equal chunks (``torch.chunk``, FSDP2's
    ``Shard(0)`` layout); the chunks of several gradients are laid out rank-major in one flat buffer,
    and one reduce-scatter (SUM: the sample weights already sum to 1 over the global batch)
    leaves each rank the sum of its own chunks. Buckets of about ``bucket_bytes``, flushed in the same
    order on every rank; ``add`` calls must come in the same parameter order on every rank.
    """

    def __init__(self, bucket_bytes: int = 25 * 2**20) -> None:
        self.bucket_bytes = bucket_bytes
        self.pending: list[tuple[nn.Parameter, Tensor]] = []
        self.size = 0

    def add(self, param: nn.Parameter, grad: Tensor) -> None:
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
            raise TypeError(f"expected a parameter sharded by fully_shard (DTensor, Shard(0)); got "
                            f"{type(param).__name__} {getattr(param, 'placements', '')}")
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(f"gradient of shape {tuple(grad.shape)} for a parameter of shape {tuple(param.shape)}")
        grad = grad.to(param.dtype)
        self.pending.append((param, grad))
        self.size += grad.numel() * grad.element_size()
        if self.size >= self.bucket_bytes:
            self.flush()

    def flush(self) -> None:
        """Reduce-scatter what is pending (every rank calls it at the same point)."""
        import torch.distributed as torch_dist
        from torch.distributed.tensor import DTensor

        if not self.pending:
            return
        mesh = self.pending[0][0].device_mesh
        world = mesh.size()
        chunks = []  # per gradient: [world, rows * rest], row r = rank r's chunk (zero padding at the end)
        for param, grad in self.pending:
            rows = math.ceil(param.shape[0] / world)
            padded = grad.new_zeros(rows * world, *param.shape[1:])
            padded[:param.shape[0]] = grad
            chunks.append(padded.reshape(world, -1))
        flat = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0].contiguous()
        out = flat.new_empty(flat.shape[1])
        # reduce_scatter_single: torch >= 2.13's name for reduce_scatter_tensor (deprecated there)
        reduce_scatter = getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor
        reduce_scatter(out, flat.reshape(-1), op=torch_dist.ReduceOp.SUM, group=mesh.get_group())
        offset = 0
        for (param, _), chunk in zip(self.pending, chunks, strict=True):
            width = chunk.shape[1]
            local_rows = param.to_local().shape[0]  # the last ranks' chunks are shorter (or empty)
            local = out[offset:offset + width].view(-1, *param.shape[1:])[:local_rows]
            offset += width
            grad = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                      stride=param.stride())
            param.grad = grad if param.grad is None else param.grad + grad
        self.pending, self.size = [], 0
