"""Draw training batches from per-domain packers under a mixture a mixer may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.data.packing import DomainPacker


@dataclass
class Batch:
    """One rank's micro-batch: inputs and next-token targets [b, T], domain ids [b]."""

    input_ids: Tensor
    targets: Tensor
    domain: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.domain)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class MixtureSampler:
    """Each sample's domain is drawn from ``mixture``; its tokens come from that domain's packer.

    The domains of the *global* micro-batch (``batch * world`` slots) are drawn with a
    generator seeded identically on every rank, and rank ``r`` fills slots
    ``[r*batch, (r+1)*batch)`` from its own document shard: the global batch follows the
    mixture exactly as in a single process, and ranks never read the same document.
    """

    def __init__(self, packers: list[DomainPacker], mixture: list[float] | Tensor, *, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.packers, self.rank, self.world = packers, rank, world
        self.mixture = torch.as_tensor(mixture, dtype=torch.float64).clone()
        self.generator = torch.Generator().manual_seed(seed)
        self.set_mixture(self.mixture)

    def set_mixture(self, mixture: Tensor) -> None:
        """Sampling probabilities over domains, used from the next batch on."""
        probs = torch.as_tensor(mixture, dtype=torch.float64).detach().cpu().clamp_min(0)
        if probs.shape != (len(self.packers),) or not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise ValueError(f"a mixture needs {len(self.packers)} finite non-negative entries, got {mixture}")
        self.mixture = probs / probs.sum()

    def next_batch(self, batch: int) -> Batch:
        slots = torch.multinomial(self.mixture, batch * self.world, replacement=True, generator=self.generator)
        domains = slots[self.rank * batch:(self.rank + 1) * batch]
        windows = np.stack([self.packers[int(d)].next_window() for d in domains]).astype(np.int64)
        tokens = torch.from_numpy(windows)
        return Batch(tokens[:, :-1], tokens[:, 1:], domains.to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "mixture": self.mixture.clone(),
                "packers": [p.state_dict() for p in self.packers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.mixture = state["mixture"].clone()
        for packer, packer_state in zip(self.packers, state["packers"], strict=True):
            packer.load_state_dict(packer_state)
