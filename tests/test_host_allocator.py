"""dograph/host_allocator.py: freed tensor memory stays mapped, so a step's tensors stop page-faulting."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from dograph.errors import ConfigError
from dograph.host_allocator import tune_host_allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# a training step's pattern: tensors written, freed, and allocated again the next round; prints the
# minor page faults of rounds 3-20 (glibc without the settings faults most of these pages in again)
ROUNDS, TENSORS, FLOATS = 20, 4, 4 << 20  # 4 x 16 MiB a round
PROBE = textwrap.dedent(f"""
    import resource, sys, torch
    from dograph.host_allocator import tune_host_allocator
    applied = tune_host_allocator(sys.argv[1])
    faults = 0
    for round in range({ROUNDS}):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones({FLOATS}) for _ in range({TENSORS})]
        del tensors
        if round >= 2:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
""")
PAGES = (ROUNDS - 2) * TENSORS * FLOATS * 4 // 4096  # the pages those rounds write


def probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt parameters")
def test_heap_mode_reuses_the_pages_of_freed_tensors():
    applied, faults = probe("heap")
    assert applied
    # measured: 0-6% (the VM reclaims some idle pages); glibc's default: 10-98%
    assert faults < 0.25 * PAGES, f"{faults} minor faults for {PAGES} pages written"
    assert probe("system")[0] is False


def test_an_unknown_mode_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DOGRAPH_HOST_ALLOCATOR", "jemalloc")
    with pytest.raises(ConfigError, match="DOGRAPH_HOST_ALLOCATOR must be one of heap, system"):
        tune_host_allocator()


def test_system_mode_changes_nothing():
    assert tune_host_allocator("system") is False
