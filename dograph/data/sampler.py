"""Draw training batches from per-domain packers under a mixture a mixer may change.

The domains of a batch are always drawn here, on the training thread, from the mixture in
effect at that step; only the per-domain windows may be prepared ahead (``dograph.data.prefetch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dograph.data.packing import DomainPacker
from dograph.data.prefetch import WindowPrefetcher


@dataclass
class Batch:
    """One rank's micro-batch: inputs and next-token targets [b, T], domain ids [b]."""

    input_ids: Tensor
    targets: Tensor
    domain: Tensor

    def to(self, device: torch.device) -> Batch:
        """Copies to ``device``; asynchronous from pinned host memory (``MixtureSampler.next_batch(pin=True)``)."""
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
        self.prefetcher: WindowPrefetcher | None = None
        self.set_mixture(self.mixture)

    def set_prefetch(self, windows: int) -> None:
        """Prepare up to ``windows`` windows per domain on a background thread; 0 packs on the calling thread.

        Batches are identical either way (the domains are still drawn at step time).
        """
        self.close()
        self.prefetcher = WindowPrefetcher(self.packers, windows) if windows > 0 else None

    def close(self) -> None:
        """Stop the prefetch thread, if any (packers rewind to what was consumed; it restarts on demand)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    def set_mixture(self, mixture: Tensor) -> None:
        """Sampling probabilities over domains, used from the next batch on."""
        probs = torch.as_tensor(mixture, dtype=torch.float64).detach().cpu().clamp_min(0)
        if probs.shape != (len(self.packers),) or not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise ValueError(f"a mixture needs {len(self.packers)} finite non-negative entries, got {mixture}")
        self.mixture = probs / probs.sum()

    def _window(self, domain: int) -> np.ndarray:
        if self.prefetcher is not None:
            return self.prefetcher.next_window(domain)
        return self.packers[domain].next_window()

    def next_batch(self, batch: int, *, pin: bool = False) -> Batch:
        """The next micro-batch; ``pin`` puts it in page-locked memory so a device copy can be asynchronous."""
        slots = torch.multinomial(self.mixture, batch * self.world, replacement=True, generator=self.generator)
        domains = slots[self.rank * batch:(self.rank + 1) * batch].to(torch.int64)
        tokens = torch.from_numpy(np.stack([self._window(int(d)) for d in domains]).astype(np.int64))
        if pin:
            tokens, domains = tokens.pin_memory(), domains.pin_memory()
        return Batch(tokens[:, :-1], tokens[:, 1:], domains)

    def state_dict(self) -> dict[str, Any]:
        """Generator, mixture and packer positions of what was consumed (never of windows prepared ahead).

        With :meth:`load_state_dict`, the ``Stateful`` protocol of ``torch.distributed.checkpoint``:
        this rank's data position in the checkpoint (``dograph.train.checkpointer``, saved per rank).
        """
        packers = (self.prefetcher.state_dicts() if self.prefetcher is not None
                   else [p.state_dict() for p in self.packers])
        return {"generator": self.generator.get_state(), "mixture": self.mixture.clone(), "packers": packers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` saved (windows prepared ahead are dropped)."""
        self.generator.set_state(state_dict["generator"])
        self.mixture = state_dict["mixture"].clone()
        if self.prefetcher is not None:
            self.prefetcher.load_state_dicts(state_dict["packers"])
            return
        for packer, packer_state in zip(self.packers, state_dict["packers"], strict=True):
            packer.load_state_dict(packer_state)
