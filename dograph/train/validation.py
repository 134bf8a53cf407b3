"""Validation: per-domain loss and perplexity on the fixed held-out windows.

Reported loss is the mean token cross-entropy in nats and perplexity is exp(loss); the
paper's "PPL" values (3.09 to 4.51) look like mean token loss, so both are reported
(docs/design.md section 1). The average over domains is weighted by the natural mixture, so it
does not move with the training mixture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dograph.distributed import DistContext, all_reduce_sum


@torch.no_grad()
def _domain_loss_sum(model: nn.Module, windows: Tensor, batch_size: int, device: torch.device,
                     autocast: Callable[[], AbstractContextManager], *, calls: int = 0,
                     filler: Tensor | None = None) -> tuple[Tensor, int]:
    """Loss sum and token count of ``windows``; ``calls``: run at least that many forwards.

    Under FSDP every rank must run the same number of forwards (each all-gathers parameters with
    the others), so a rank with fewer windows forwards ``filler`` (one window) and discards it.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = range(0, len(windows), batch_size)
    for start in starts:
        chunk = windows[start:start + batch_size].to(device)
        with autocast():
            logits = model(input_ids=chunk[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").double()
    for _ in range(calls - len(starts)):
        with autocast():
            model(input_ids=filler.to(device)[:, :-1])
    return total, windows[:, 1:].numel()


def evaluate(model: nn.Module, validation: list[Tensor], domains: list[str], natural_mixture: list[float], *,
             batch_size: int, device: torch.device, dist: DistContext,
             autocast: Callable[[], AbstractContextManager], lockstep: bool = False) -> dict[str, Any]:
    """``val/<domain>/loss``, ``val/<domain>/ppl``, ``val/avg_loss`` (natural mixture), ``val/worst_loss``.

    Each rank scores a slice of the windows; sums are all-reduced, so every rank returns the
    same numbers. ``lockstep`` (a sharded model): every rank runs the same number of forwards.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(domains), 2, dtype=torch.float64, device=device)
    for i, windows in enumerate(validation):
        calls = math.ceil(math.ceil(len(windows) / dist.world_size) / batch_size) if lockstep else 0
        loss_sum, tokens = _domain_loss_sum(model, windows[dist.rank::dist.world_size], batch_size, device,
                                            autocast, calls=calls, filler=windows[:1])
        sums[i, 0], sums[i, 1] = loss_sum, tokens
    all_reduce_sum(dist, sums)
    model.train(was_training)
    losses = (sums[:, 0] / sums[:, 1]).tolist()
    out: dict[str, Any] = {}
    for domain, loss in zip(domains, losses, strict=True):
        out[f"val/{domain}/loss"] = loss
        out[f"val/{domain}/ppl"] = math.exp(min(loss, 50.0))
    avg = sum(w * loss for w, loss in zip(natural_mixture, losses, strict=True))
    out.update({"val/avg_loss": avg, "val/avg_ppl": math.exp(min(avg, 50.0)), "val/worst_loss": max(losses)})
    return out
