"""Peak memory per job: the CPU high-water mark restarts at each reset (jobs of a sweep share a process)."""

from __future__ import annotations

import gc
import mmap

import pytest

from moa_train.core.memory import peak_memory_mb, reset_peak_memory


def test_cpu_peak_restarts_after_reset() -> None:
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform cannot reset the resident-memory high-water mark")
    before = peak_memory_mb("cpu")
    # fresh anonymous pages from the kernel, every page touched: a tensor could reuse resident pages of
    # the heap when an earlier test in this process tuned the allocator (mallopt), and then no RSS grows
    big = mmap.mmap(-1, 96 * 2**20)
    big.write(b"\x01" * len(big))
    during = peak_memory_mb("cpu")
    assert during - before >= 90
    big.close()
    gc.collect()
    reset_peak_memory("cpu")
    after = peak_memory_mb("cpu")
    assert during - after >= 60  # the next job no longer inherits this peak
