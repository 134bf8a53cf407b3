"""Keep the CPU allocator from unmapping tensor memory and faulting it back in every step (Linux, glibc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KiB,
adapting up to 32 MiB) with fresh pages from ``mmap`` and unmaps them on ``free``, so a training step
faults its activations and gradients in again every time: on the 2-core VM about 85,000 minor page
faults and 150-220 ms of kernel time per gpt2_tiny step (batch 16 x 128), some 15% of the step's CPU
time, and DoGraph's step, which keeps its inputs and output-grads until the weighted update, faults
more than uniform's (docs/performance.md, "Page faults"). Serving every block from the heap
(``M_MMAP_MAX = 0``) and keeping freed memory instead of trimming it (``M_TRIM_THRESHOLD``) lets each
step reuse the previous step's pages: no faults after the first steps. The cost: a process keeps
its peak heap until it exits. This is what preloading jemalloc or tcmalloc does in PyTorch's CPU
performance tuning guide, without the dependency. The parameter numbers are glibc's ``<malloc.h>``
(``mallopt(3)``).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from dograph.errors import ConfigError

# glibc <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): free memory above it goes back
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time (fewer brk calls while the first steps find their peak)
MODES = ("heap", "system")
ENV = "DOGRAPH_HOST_ALLOCATOR"


def tune_host_allocator(mode: str | None = None) -> bool:
    """Apply ``mode`` (``heap``: the settings above; ``system``: leave malloc alone) to this process.

    ``mode=None`` reads ``$DOGRAPH_HOST_ALLOCATOR`` (default ``heap``). Returns whether the settings
    were applied: only with glibc on Linux, where ``mallopt`` has these parameters. Call it once at a
    program's start, before the large tensors exist (blocks already mapped stay mapped).
    """
    mode = mode if mode is not None else os.environ.get(ENV, "heap")
    if mode not in MODES:
        raise ConfigError(f"{ENV} must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "system" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
