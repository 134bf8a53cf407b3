"""Timing of device work without host synchronisation (docs/design.md section 5: at most one sync per step)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class StepTimer:
    """Accumulates seconds of device work without synchronising (CUDA events, read lazily).

    On CUDA each ``measure`` records a pair of events on the current stream, so the time is
    the GPU's, not the host's launch time; ``float(timer)`` waits for them (call it at log
    time). On the CPU it is wall-clock time around the block.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.seconds = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began

    def __float__(self) -> float:
        """Total seconds; on CUDA this waits for the recorded events (call it at log time)."""
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000.0
