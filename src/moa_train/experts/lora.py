"""LoRA experts at one linear site (method spec A.1, C.1, C.6-C.9).

E = 1 is plain LoRA: delta(x) = (alpha/r) B A x with A Kaiming-uniform and B = 0.
E > 1 is a homogeneous mixture with its own site router: MoLoRA (dense softmax), HydraLoRA (one shared
A, E B-heads), Top-K MoE-LoRA / MixLoRA (top-k, renormalised) and AdaMoLE (shifted threshold).
The E experts are stored concatenated, so the dense mixture is two matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.config import RouterConfig
from moa_train.experts.mixing import gather_rows, weight_hidden
from moa_train.routers import Router


class LoRAExperts(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        num_experts: int = 1,
        shared_a: bool = False,
        router_cfg: RouterConfig | None = None,
        state=None,
    ) -> None:
        super().__init__()
        self.rank, self.num_experts, self.shared_a = rank, num_experts, shared_a and num_experts > 1
        self.scale = alpha / rank
        self._state = state
        rows_a = rank if (self.shared_a or num_experts == 1) else rank * num_experts
        self.A = nn.Parameter(torch.empty(rows_a, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank * num_experts))
        # nn.Linear's default init: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(in_features, num_experts, router_cfg, state) if num_experts > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        if self.router is None:
            out = F.linear(F.linear(x, self.A), self.B)
            return out if self.scale == 1.0 else out * self.scale
        mask = None if self._state is None else self._state.token_mask
        route = self.router(x, mask)
        if route.keep is not None and self._state is not None and self._state.use_gather(x):
            return self._sparse(x, route.weights, route.keep)
        hidden = weight_hidden(F.linear(x, self.A), route.weights.to(x.dtype), self.rank, self.shared_a)
        return F.linear(hidden, self.B) * self.scale

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Run each expert only on the tokens that selected it (Top-K / AdaMoLE sparse execution)."""
        flat = x.reshape(-1, x.shape[-1])
        w = weights.reshape(-1, self.num_experts).to(x.dtype)
        out = flat.new_zeros(flat.shape[0], self.B.shape[0])
        r = self.rank
        for e in range(self.num_experts):
            rows = gather_rows(keep[..., e])
            a = self.A if self.shared_a else self.A[e * r : (e + 1) * r]
            delta = F.linear(F.linear(flat[rows], a), self.B[:, e * r : (e + 1) * r])
            out.index_add_(0, rows, delta * (w[rows, e : e + 1] * self.scale))
        return out.reshape(*x.shape[:-1], -1)
