"""Segment ids of packed rows (several examples per row) as the routers need them.

``segment_ids`` [B, T]: 1, 2, ... for the examples of each row, 0 on padding (data/packing.py builds
them). Attention isolation is transformers' business (block-diagonal mask from per-example position
ids); what is moa_train's: token masks count real tokens only (``segment_ids > 0``), an instance router
pools each example on its own and gives its gate to that example's tokens only, and the fallback of an
instance mask that selects no token is decided per example, as for an unpacked row.
"""

from __future__ import annotations

import torch


def segment_index(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(index [B, T] of each token's example slot, ``b * T + segment - 1``, 0 on padding; real [B, T]
    bool; number of slots B * T). The slot count is an upper bound known without reading the device
    (no host sync, one graph under torch.compile); unused slots have no real token, so every statistic
    weighted by real-token counts ignores them."""
    batch, length = segment_ids.shape
    real = segment_ids > 0
    rows = torch.arange(batch, device=segment_ids.device)[:, None] * length
    index = torch.where(real, rows + segment_ids - 1, torch.zeros_like(segment_ids))
    return index, real, batch * length


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where the segment id changes (padding counts on as its own run)."""
    length = segment_ids.shape[1]
    steps = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return steps - torch.where(starts, steps, torch.zeros_like(steps)).cummax(1).values


def segment_sum(values: torch.Tensor, index: torch.Tensor, real: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of values [B, T, ...] over each example's tokens -> [N, ...] (padding excluded)."""
    flat = values[real]
    return flat.new_zeros((count, *values.shape[2:])).index_add_(0, index[real], flat)


def pool_segments(
    x: torch.Tensor, pool: torch.Tensor | None, segments: tuple[torch.Tensor, torch.Tensor, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example masked mean of x [B, T, H] over the tokens where pool [B, T] is 1 (all real tokens
    when None) -> (pooled [N, 1, H], real-token counts [N, 1]): the same sums an unpacked row of each
    example gives (``MoALayer._route_instance``). ``segments``: :func:`segment_index` of the batch."""
    index, real, count = segments
    weight = real.to(x.dtype) if pool is None else pool.to(x.dtype) * real.to(x.dtype)
    sums = segment_sum(x * weight.unsqueeze(-1), index, real, count)
    denominators = segment_sum(weight, index, real, count).clamp_min(1.0)
    tokens = segment_sum(real.to(x.dtype), index, real, count)
    return (sums / denominators[:, None]).unsqueeze(1), tokens[:, None]


def spread(per_example: torch.Tensor, index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[N, 1, E] per-example values -> [B, T, E] on each example's tokens, zero on padding."""
    values = per_example[:, 0][index]
    return (
        values * real.unsqueeze(-1).to(values.dtype)
        if values.is_floating_point()
        else values & real[..., None]
    )


def instance_fallback(
    instance: torch.Tensor, token_mask: torch.Tensor, segments: tuple[torch.Tensor, torch.Tensor, int]
) -> torch.Tensor:
    """An example whose instance mask selects no token pools over all its real tokens (per example, as an
    unpacked row does per row)."""
    index, real, count = segments
    selected = segment_sum(instance.to(torch.float32), index, real, count)
    empty = (selected == 0)[index] & real
    return torch.where(empty, token_mask.to(instance.dtype), instance)
