"""Shared arithmetic of homogeneous multi-expert sites: E experts as two matmuls, no loop over experts."""

from __future__ import annotations

import torch


def weight_hidden(hidden: torch.Tensor, weights: torch.Tensor, width: int, shared: bool) -> torch.Tensor:
    """Scale each expert's block of hidden units by that expert's routing weight.

    hidden: [..., E*width] (one block per expert) or [..., width] when the first projection is shared
    (HydraLoRA, PA-MoE with a shared down-projection); weights: [..., E]. Returns [..., E*width], ready
    for the concatenated second projection, so that sum_e w_e * B_e h_e is one matmul.
    """
    num = weights.shape[-1]
    if shared:
        return (weights.unsqueeze(-1) * hidden.unsqueeze(-2)).flatten(-2)
    return (hidden.unflatten(-1, (num, width)) * weights.unsqueeze(-1)).flatten(-2)


def gather_rows(keep: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (flattened tokens) where ``keep`` [...] is True."""
    return keep.reshape(-1).nonzero().squeeze(1)


# Perf (sparse_impl=gather): every distinct row count is a new GEMM shape, and oneDNN builds a new kernel
# for each new shape (~0.7 ms measured on the project's CPU, more than the GEMM itself), so a gathered
# expert whose token count changes every step paid that build on every matmul (Sparse MoA with gather
# took 1.6x PEFT LoRA's step). Padding the count up to one of GATHER_BUCKETS sizes bounds the number of
# shapes, so kernels are reused after warm-up; at most 1/GATHER_BUCKETS of the tokens is padding.
GATHER_BUCKETS = 16


def padded_rows(keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(indices, n): the n kept rows of ``keep`` [...], then copies of the first kept index up to a
    multiple of ceil(rows / GATHER_BUCKETS). Padding repeats a kept row, so no skipped token ever reaches
    an expert; callers give the padding a zero gate, so it adds exactly zero."""
    rows = gather_rows(keep)
    n, total = rows.numel(), keep.numel()
    if n == 0:  # nothing kept (also: an empty input, e.g. a block slot that kept no token)
        return rows, n
    step = -(-total // GATHER_BUCKETS)
    size = min(total, -(-n // step) * step)
    if size == n:
        return rows, n
    return torch.cat([rows, rows[:1].expand(size - n)]), n


def zero_padding(values: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` [rows, ...] with the rows from n on (padding of padded_rows) set to zero."""
    if n == values.shape[0]:
        return values
    return torch.cat([values[:n], values.new_zeros(values.shape[0] - n, *values.shape[1:])])


def autocasting(t: torch.Tensor) -> bool:
    """True when autocast is on for ``t``'s device: F.linear will cast its inputs to the autocast dtype."""
    return torch.is_autocast_enabled(t.device.type)


# Perf (decoding on CPU): oneDNN's bf16 GEMM has a fixed cost of ~12 us per call whatever its size, while an
# fp32 (MKL) GEMM of an adapter's few-row input takes 3-7 us; measured crossover ~64 rows on the project's
# CPU. So under CPU autocast an adapter (LoRA, PA, router, prompt) whose input has at most this many rows
# runs in fp32 with autocast off: faster for decoding (batch x 1 token) and, if anything, more precise.
FEW_ROWS = 64


def few_rows_on_cpu(x: torch.Tensor, rows: int | None = None) -> bool:
    """True for a decoding-sized input (<= FEW_ROWS rows) on CPU under autocast (see FEW_ROWS)."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    return (x.numel() // max(x.shape[-1], 1) if rows is None else rows) <= FEW_ROWS


def autocast_off():
    """Context manager that turns autocast off: torch's C-level guard when present (~0.3 us per use, vs ~2 us
    for ``torch.autocast(enabled=False)``, which adds up over the adapters of every layer while decoding)."""
    guard = getattr(torch._C, "_DisableAutocast", None)
    if guard is None or torch.compiler.is_compiling():  # dynamo traces torch.autocast, not the C guard
        return torch.autocast("cpu", enabled=False)
    return guard()
