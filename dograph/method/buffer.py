"""FIFO buffer of projected per-sample gradients (docs/design.md section 2.2).

The buffer holds the last ``capacity`` projected gradients (default N = 4096) that the
K-means refresh clusters into model-centric domains, each with the human domain id of
its sequence (-1 when unknown) for the per-refresh agreement log (docs/design.md section 2.6).

It is a ring buffer: ``push`` copies a batch into preallocated storage on the buffer's
device with slice copies only, so it never synchronises with the host. The write
position and fill level are Python ints computed from tensor *shapes*, not values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ProjectionBuffer"]


class ProjectionBuffer:
    """Ring buffer of the last ``capacity`` rows of shape [dim] (float32) plus int64 labels.

    Rows come out oldest first (``data()``, ``labels()``). Storage is float32 whatever the
    input dtype (our choice: bf16 gradients would lose K-means precision for little memory:
    4096 x 1024 float32 is 16 MiB).
    """

    def __init__(self, capacity: int, dim: int, *, device: torch.device | str | None = None) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"ProjectionBuffer needs capacity >= 1 and dim >= 1, got {capacity=} {dim=}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self._data = torch.zeros(self.capacity, self.dim, dtype=torch.float32, device=device)
        self._labels = torch.full((self.capacity,), -1, dtype=torch.int64, device=device)
        self._pos = 0  # next row to write
        self._size = 0  # rows filled

    @property
    def device(self) -> torch.device:
        return self._data.device

    def __len__(self) -> int:
        return self._size

    @property
    def is_full(self) -> bool:
        return self._size == self.capacity

    def push(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Append the rows of ``x`` [b, dim] (and their labels [b], -1 if None); no host sync.

        When b exceeds the capacity only the last ``capacity`` rows are kept.
        """
        x, labels = self._check(x, labels)
        b = x.shape[0]
        if b >= self.capacity:
            self._data.copy_(x[b - self.capacity :])
            self._labels.copy_(labels[b - self.capacity :])
            self._pos, self._size = 0, self.capacity
            return
        first = min(b, self.capacity - self._pos)
        self._write(self._pos, x[:first], labels[:first])
        self._write(0, x[first:], labels[first:])
        self._pos = (self._pos + b) % self.capacity
        self._size = min(self._size + b, self.capacity)

    def _write(self, start: int, x: Tensor, labels: Tensor) -> None:
        n = x.shape[0]
        if n:
            self._data[start : start + n].copy_(x)
            self._labels[start : start + n].copy_(labels)

    def _check(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"push expects a tensor of shape [b, {self.dim}], got {tuple(x.shape)}")
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=self.device)
        elif labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(labels.shape)}")
        return x.detach(), labels.detach()

    def _ordered(self, t: Tensor) -> Tensor:
        if not self.is_full or self._pos == 0:
            return t[: self._size]
        return torch.cat([t[self._pos :], t[: self._pos]])

    def data(self) -> Tensor:
        """The filled rows [n, dim], oldest first (a view when no wrap-around, else a copy)."""
        return self._ordered(self._data)

    def labels(self) -> Tensor:
        """The labels [n] of ``data()``'s rows, oldest first (-1: unknown)."""
        return self._ordered(self._labels)

    def clear(self) -> None:
        """Forget every row (storage is kept)."""
        self._labels.fill_(-1)
        self._pos = self._size = 0

    def state_dict(self) -> dict[str, Any]:
        """Exact state: storage, labels, write position and fill level."""
        return {
            "data": self._data.clone(),
            "labels": self._labels.clone(),
            "pos": self._pos,
            "size": self._size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; tensors land on this buffer's device."""
        if tuple(state["data"].shape) != (self.capacity, self.dim):
            raise ValueError(
                f"buffer state has shape {tuple(state['data'].shape)}, expected ({self.capacity}, {self.dim})"
            )
        self._data.copy_(state["data"])
        self._labels.copy_(state["labels"])
        self._pos, self._size = int(state["pos"]), int(state["size"])

    def to(self, device: torch.device | str) -> ProjectionBuffer:
        """Move the storage to ``device`` (in place); returns self."""
        self._data = self._data.to(device)
        self._labels = self._labels.to(device)
        return self
