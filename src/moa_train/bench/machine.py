"""The machine: its description, the glibc allocator settings the timings run under, and peak memory
measured per variant in a fresh subprocess (a process's peak RSS never goes down)."""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from moa_train.bench.variants import attach
from moa_train.bench.workload import Runner, Setup, build_base, make_batch


def machine_info(device: str) -> dict:
    # deferred: torch is heavy; keeps moa-bench --help fast
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
    }
    try:
        # deferred: heavy, and only their versions are read
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # deferred: ~3 ms; moa-bench --help does not need it

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return (
            libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
            and libc.mallopt(m_trim_threshold, trim_threshold) == 1
        )
    except (OSError, AttributeError):
        return False


def unpin_malloc() -> str | None:
    """Back to glibc's default thresholds (128 KiB), for the decoding phase.

    Decoding allocates many mid-sized blocks per token (logits rows, growing KV caches); served from a
    pinned heap it ran ~11 % slower for PEFT LoRA, and Soft MoA ~18 %, than in a process with the
    defaults, which is how moa-eval and users decode (measured: Soft MoA 0.91 x PEFT LoRA pinned, 0.96 with
    the defaults restored).
    """
    ok = _mallopt(128 * 1024, 128 * 1024)
    return "glibc default thresholds (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD 128 KiB)" if ok else None


def pin_malloc() -> str | None:
    """glibc: serve allocations up to 32 MiB from the heap and never trim it (mallopt), for training steps.

    By default glibc mmaps large blocks and, after each free, raises its mmap threshold; whether a variant's
    activations come back as fresh (page-faulting, zero-filled) pages then depends on what ran before it,
    which showed up as order-dependent step times of +-30 % between interleaved variants. With a fixed
    threshold every variant reuses warm heap memory after the warm-up round (blocks above 32 MiB, such as
    the [tokens, vocab] logits, are mmapped for every variant alike).
    """
    ok = _mallopt(32 * 2**20, 2**30)
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB" if ok else None


def memory_probe(setup: Setup, name: str, steps: int) -> dict:
    """Peak memory of ``steps`` training steps of one variant (run in its own process)."""
    # deferred: torch (also via core.memory) is heavy; keeps moa-bench --help fast
    import resource

    import torch

    from moa_train.core.memory import reset_peak_memory, status_kb

    base, tokenizer, _ = build_base(setup)
    batch = make_batch(tokenizer, base.config.vocab_size, setup.batch, setup.seq, setup.seed, setup.device)
    runner = Runner(name, attach(base, name), setup.device)
    gc.collect()
    result: dict[str, Any] = {}
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for _ in range(steps):
            runner.step(batch)
        result.update(
            peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, start_mem_mb=start / 2**20,
            method="torch.cuda.max_memory_allocated during the steps (weights included)",
        )  # fmt: skip
        return result
    reset = reset_peak_memory("cpu")
    start = status_kb("VmRSS")
    for _ in range(steps):
        runner.step(batch)
    peak = status_kb("VmHWM") if reset else None
    if peak is None:  # no /proc: lifetime peak (includes model loading)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss of a fresh process (lifetime peak, includes loading)"
    else:
        method = (
            "VmHWM of a fresh process per variant (glibc MALLOC_MMAP_THRESHOLD_=65536), reset just "
            "before the first step: peak resident memory during the steps, weights included"
        )
    result.update(peak_mem_mb=peak / 1024, start_mem_mb=(start or 0) / 1024, method=method)
    return result


def run_memory_probes(setup: Setup, names: list[str], steps: int, threads: int | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in names:
        cmd = [sys.executable, "-m", "moa_train.bench", "--_memory-probe", name, "--mem-steps", str(steps),
               *_setup_args(setup)]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        # glibc: serve every allocation >= 64 KiB by mmap (returned to the OS when freed), so the peak RSS
        # tracks live tensors instead of whatever the heap happened to keep cached
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            out[name] = {"error": f"memory probe failed (exit {proc.returncode}): {' | '.join(tail)}"}
        else:
            out[name] = json.loads(lines[-1])
        print(f"  memory {name}: {out[name].get('peak_mem_mb', float('nan')):.0f} MB", flush=True)
    return out


def _setup_args(setup: Setup) -> list[str]:
    args = ["--model", setup.model_name, "--device", setup.device, "--batch", str(setup.batch),
            "--seq", str(setup.seq), "--base-dtype", setup.dtype, "--seed", str(setup.seed)]  # fmt: skip
    if setup.layers:
        args += ["--layers", str(setup.layers)]
    return args
