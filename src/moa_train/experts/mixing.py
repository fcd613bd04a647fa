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


def autocasting(t: torch.Tensor) -> bool:
    """True when autocast is on for ``t``'s device: F.linear will cast its inputs to the autocast dtype."""
    return torch.is_autocast_enabled(t.device.type)

