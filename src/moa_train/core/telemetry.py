"""Router statistics accumulated on the device, read on demand (no host sync per forward).

Each router owns a RouterTelemetry; the model reads the primary router of every layer (the block
router, or for homogeneous baselines the router at the FFN-down site, as the official analysis does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation).

    Always False while torch.compile traces: a compiled forward never runs again in backward (AOTAutograd
    recomputes inside the compiled backward graph, without Python side effects), and the Python query
    would split the graph (see moa_train.core.compile)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class RouterTelemetry(nn.Module):
    """Running sums over real tokens: gate, activity, entropy, threshold. Buffers are not saved."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("gate_sum", torch.zeros(num_experts), persistent=False)
        self.register_buffer("active_sum", torch.zeros(num_experts), persistent=False)
        # tokens, entropy sum, threshold sum, threshold token count
        self.register_buffer("scalars", torch.zeros(4), persistent=False)

    @torch.no_grad()
    def update(
        self,
        weights: torch.Tensor,
        keep: torch.Tensor | None,
        probs: torch.Tensor,
        threshold: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> None:
        """weights/probs/keep: [..., E]; threshold: [..., 1] or None; mask: [...] token weights or None."""
        num = weights.shape[-1]
        w = weights.detach().float().reshape(-1, num)
        m = torch.ones(w.shape[0], device=w.device) if mask is None else mask.detach().float().reshape(-1)
        active = (w != 0).float() if keep is None else keep.reshape(-1, num).float()
        p = probs.detach().float().reshape(-1, num).clamp_min(1e-9)
        ent = -(p * p.log()).sum(-1)
        self.gate_sum += (w * m[:, None]).sum(0)
        self.active_sum += (active * m[:, None]).sum(0)
        tokens = m.sum()
        self.scalars[0] += tokens
        self.scalars[1] += (ent * m).sum()
        if threshold is not None:
            thr = threshold.detach().float().expand(*weights.shape[:-1], 1).reshape(-1)
            self.scalars[2] += (thr * m).sum()
            self.scalars[3] += tokens

    def reset(self) -> None:
        self.gate_sum.zero_()
        self.active_sum.zero_()
        self.scalars.zero_()


def summarize(telemetries: list[RouterTelemetry]) -> dict[str, torch.Tensor]:
    """Stack per-layer sums into [L, E] means (still on device); layers with fewer experts (per-layer
    counts, MoLA) are padded with NaN up to the largest E."""
    width = max(t.num_experts for t in telemetries)

    def padded(sums: torch.Tensor) -> torch.Tensor:
        return F.pad(sums, (0, width - sums.shape[0]), value=float("nan")) if sums.shape[0] < width else sums

    gate = torch.stack([padded(t.gate_sum) for t in telemetries])
    active = torch.stack([padded(t.active_sum) for t in telemetries])
    scalars = torch.stack([t.scalars for t in telemetries])
    tokens = scalars[:, 0].clamp_min(1.0)
    return {
        "tokens": scalars[:, 0],
        "mean_gate": gate / tokens[:, None],
        "active_frac": active / tokens[:, None],
        "active_per_token": active.nansum(1) / tokens,
        "entropy": scalars[:, 1] / tokens,
        "mean_threshold": scalars[:, 2] / scalars[:, 3].clamp_min(1.0),
        "has_threshold": scalars[:, 3] > 0,
    }
