"""Process-group facts passed explicitly (no module globals) and collective helpers.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain ``python run.py`` is a world of 1 and
every helper here is then a no-op, so library code calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dograph.errors import DographError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when it is there; asking for CUDA without it is an error."""
    from dograph.errors import ConfigError

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available (use trainer.device=auto or cpu)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_request: str = "auto") -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, tensor: Tensor) -> Tensor:
    """In-place sum over ranks; returns the tensor."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(ctx: DistContext, tensor: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order)."""
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast(ctx: DistContext, tensor: Tensor, src: int = 0) -> Tensor:
    if ctx.enabled:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out



def from_main(ctx: DistContext, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its value on every rank.

    An error there is raised on every rank with the same one line, so no rank waits in a
    collective that rank 0 never reaches (a bug keeps its trace on rank 0).
    """
    outcome: tuple[bool, Any] | None = None
    error: Exception | None = None
    if ctx.is_main:
        try:
            outcome = (True, compute())
        except Exception as exc:  # shared with the other ranks, then raised
            error = exc
            shared = exc if isinstance(exc, DographError) else DographError(
                f"rank 0 failed: {type(exc).__name__}: {exc}".splitlines()[0])
            outcome = (False, shared)
    ok, value = all_gather_objects(ctx, outcome)[0]
    if ok:
        return value
    if error is not None:
        raise error
    raise value


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_gradients(ctx: DistContext, params: list[torch.nn.Parameter],
                         bucket_bytes: int = 25 * 2**20) -> None:
    """Sum gradients over ranks in flat buckets.

    Used when gradients are formed outside autograd (DoGraph's one-backward update),
    where DDP's reducer never sees them (docs/design.md section 6); sample weights already sum
    to 1 over the global batch, so the global gradient is the SUM over ranks.
    """
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0
