"""Tokenise and pack training windows ahead of the step on a background thread, without changing them.

Why this shape. The mixture may change after every step, so a batch prepared ahead would have
been drawn from an older mixture. The worker therefore does only the mixture-independent work:
each domain's packer runs ahead into its own bounded buffer of windows. The training thread
still draws the domains of a batch from the current mixture and takes the next window of each
drawn domain at step time. A domain's window sequence depends on its packer alone, so batches
are bit-identical to the synchronous path (``trainer.prefetch=0``).

Exact resume. Each prepared window carries its packer's position *after* it (a cheap snapshot:
packer buffers are never written in place). The data state is the position after the last
window *consumed*, so a checkpoint taken while windows wait in the buffers resumes exactly where
training stopped, not where the worker got to.

Errors. An exception in the worker is kept with its domain and raised on the training thread
when that domain next needs a window and none is ready, which is exactly when the synchronous
path would have raised it (a domain a mixture never samples never fails a run).

One worker per rank: each rank's packers read only that rank's documents, so rank-disjoint
sharding is unchanged. The thread is a daemon, and ``close`` stops it (the trainer closes it
when ``fit`` ends, however it ends).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from dograph.data.packing import DomainPacker

JOIN_TIMEOUT_S = 30.0  # closing waits this long for a window in progress (a stalled remote read gives up)
LIVENESS_POLL_S = 1.0  # a waiting step rechecks that the thread is alive this often (it cannot hang on a dead one)


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "buffer": np.array(state["buffer"], dtype=np.int32)}


class WindowPrefetcher:
    """Up to ``capacity`` ready windows per domain, filled by one background thread.

    The thread starts on the first ``next_window`` (after any ``load_state_dicts``). While it
    runs, only it touches the packers; the training thread reads ready windows and consumed
    positions under one condition variable.
    """

    def __init__(self, packers: list[DomainPacker], capacity: int, *, name: str = "dograph-prefetch") -> None:
        if capacity < 1:
            raise ValueError(f"a prefetcher needs a capacity of at least one window, got {capacity}")
        self.packers, self.capacity, self.name = packers, capacity, name
        self._cond = threading.Condition()
        self._ready: list[deque[tuple[np.ndarray, dict[str, Any]]]] = [deque() for _ in packers]
        self._consumed = [p.state_dict(copy=False) for p in packers]
        self._errors: list[BaseException | None] = [None] * len(packers)
        self._wanted: int | None = None  # the domain the training thread waits for (filled first)
        self._stopping = False
        self._abandoned = False  # a close gave up on a stalled worker: the packers are no longer ours
        self._thread: threading.Thread | None = None

    # ---- training thread ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        if self._abandoned:
            raise RuntimeError("the data prefetch thread was abandoned while reading; this sampler cannot continue")
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def next_window(self, domain: int) -> np.ndarray:
        """The domain's next window, in the order its packer makes them (waits until one is ready)."""
        self.start()
        with self._cond:
            queue = self._ready[domain]
            while not queue:
                error = self._errors[domain]
                if error is not None:
                    raise error
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the data prefetch thread is not running")
                self._wanted = domain
                self._cond.notify_all()
                self._cond.wait(timeout=LIVENESS_POLL_S)
            window, state = queue.popleft()
            self._consumed[domain] = state
            if self._wanted == domain:
                self._wanted = None
            self._cond.notify_all()
        return window

    def state_dicts(self) -> list[dict[str, Any]]:
        """Every packer's position after the windows consumed so far (not those prepared ahead)."""
        with self._cond:
            return [_copy_state(state) for state in self._consumed]

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Stop the worker, drop what it prepared, and set every packer's position (it restarts on demand)."""
        self.close(timeout=None)
        for packer, state in zip(self.packers, states, strict=True):
            packer.load_state_dict(state)
        self._consumed = [p.state_dict(copy=False) for p in self.packers]

    def close(self, timeout: float | None = JOIN_TIMEOUT_S) -> None:
        """Stop the worker and rewind every packer to its consumed position (idempotent).

        ``timeout=None`` waits for a window in progress however long it takes (needed before the
        packers are touched again); the default gives up on a stalled read and leaves the daemon.
        """
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout)
        self._thread = None
        if thread.is_alive():  # still reading: leave the packers to it, they are not used again
            self._abandoned = True
            return
        for packer, queue, state in zip(self.packers, self._ready, self._consumed, strict=True):
            queue.clear()
            packer.load_state_dict(state)
        self._errors = [None] * len(self.packers)
        self._wanted = None

    # ---- worker thread -------------------------------------------------------------------------------
    def _pick(self) -> int | None:
        """The domain to fill next: the one awaited, else the emptiest not full (None: all full or failed)."""
        open_domains = [d for d, q in enumerate(self._ready) if self._errors[d] is None and len(q) < self.capacity]
        if self._wanted in open_domains:
            return self._wanted
        return min(open_domains, key=lambda d: len(self._ready[d]), default=None)

    def _work(self) -> None:
        try:
            self._fill()
        finally:  # however the thread ends, a waiting step wakes up and sees it
            with self._cond:
                self._cond.notify_all()

    def _fill(self) -> None:
        while True:
            with self._cond:
                domain = self._pick()
                while domain is None and not self._stopping:
                    self._cond.wait()
                    domain = self._pick()
                if self._stopping:
                    return
            packer = self.packers[domain]
            try:
                window = packer.next_window()
                item = (window, packer.state_dict(copy=False))
            except Exception as exc:  # kept for the training thread, raised when this domain is needed
                with self._cond:
                    self._errors[domain] = exc
                    self._cond.notify_all()
                continue
            with self._cond:
                self._ready[domain].append(item)
                self._cond.notify_all()
