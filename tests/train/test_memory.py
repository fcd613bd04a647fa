"""Peak memory per job: the CPU high-water mark restarts at each reset (jobs of a sweep share a process)."""

from __future__ import annotations

import gc

import pytest
import torch

from moa_train.core.memory import peak_memory_mb, reset_peak_memory


def test_cpu_peak_restarts_after_reset() -> None:
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform cannot reset the resident-memory high-water mark")
    before = peak_memory_mb("cpu")
    big = torch.ones(96 * 2**20 // 4)  # 96 MiB, every page touched
    during = peak_memory_mb("cpu")
    assert during - before >= 90
    del big
    gc.collect()
    reset_peak_memory("cpu")
    after = peak_memory_mb("cpu")
    assert during - after >= 60  # the next job no longer inherits this peak
