"""Peak memory of a training job or benchmark: torch's allocator peak on CUDA, peak RSS on CPU.

On CPU the peak is the kernel's high-water mark of resident memory (VmHWM), which can be reset
(``/proc/self/clear_refs``), so each job of a ``-m`` sweep (all jobs share one process) and each
benchmark probe reports its own peak instead of the process's lifetime peak.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device | str) -> bool:
    """Start a new peak from the current usage; False where the platform cannot (then peaks are lifetime)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device | str) -> float:
    """MiB: ``max_memory_allocated`` on CUDA; on CPU the peak RSS since the last reset (else lifetime)."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak_kb = status_kb("VmHWM")
    if peak_kb is None:  # no /proc: the lifetime peak (ru_maxrss is KiB on Linux)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak_kb / 1024, 1)
