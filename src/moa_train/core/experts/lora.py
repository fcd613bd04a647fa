"""LoRA experts at one linear site (method spec A.1, C.1, C.6-C.9).

E = 1 is plain LoRA: delta(x) = (alpha/r) B A x with A Kaiming-uniform and B = 0.
E > 1 is a homogeneous mixture with its own site router: MoLoRA (dense softmax), HydraLoRA (one shared
A, E B-heads), Top-K MoE-LoRA (top-k, renormalised), AdaMoLE (shifted threshold), MoLA (top-k with
per-layer E) and LoRAMoE (dense softmax). The E experts are stored concatenated, so the dense mixture is
two matmuls. ``mixer=True`` is MoSLoRA: delta(x) = (alpha/r) B M A x with a learnable r x r mixer M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.core.config import RouterConfig
from moa_train.core.ops import (
    autocast_off,
    autocasting,
    few_rows_on_cpu,
    padded_rows,
    weight_hidden,
    zero_padding,
)
from moa_train.core.routers import Router


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
        mixer: bool = False,
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
        # MoSLoRA's mixer: bias-free nn.Linear(r, r) init, Kaiming-uniform a = sqrt(5) (the released code).
        self.mixer = nn.Parameter(torch.empty(rank, rank)) if mixer and num_experts == 1 else None
        if self.mixer is not None:
            nn.init.kaiming_uniform_(self.mixer, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(in_features, num_experts, router_cfg, state) if num_experts > 1 else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input: dropout(x) in the adapter dtype.

        Perf: under autocast F.linear casts x to the autocast dtype anyway, so the fp32 upcast of a bf16
        activation (a full-size copy forward and one backward, plus autocast's copy back) is skipped:
        same values, as bf16 -> fp32 -> bf16 is lossless. Kept when dropout is on (it runs in fp32).
        """
        if isinstance(self.dropout, nn.Identity) and autocasting(x):
            return x
        return self.dropout(x.to(self.A.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x)

    def delta(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``gate * delta(x)`` [..., out] for a per-token gate column [..., 1] (None: ungated).

        Perf: the gate, the routing weights and alpha/r multiply the rank-r hidden, not the [tokens, out]
        output: the same product on out/r times fewer elements, forward and backward (the gate's gradient
        becomes a sum over r instead of over out).
        """
        if few_rows_on_cpu(x):  # decoding on CPU: fp32 without autocast is faster (see FEW_ROWS)
            with autocast_off():
                return self._delta(x, gate)
        return self._delta(x, gate)

    def _delta(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        raw, x = x, self._input(x)  # the router reads the un-dropped input, as every release's does
        if self.router is None:
            hidden = F.linear(x, self.A)
            if self.mixer is not None:
                hidden = F.linear(hidden, self.mixer)
            if gate is not None:
                gate = gate if gate.dtype == hidden.dtype else gate.to(hidden.dtype)
                hidden = hidden * (gate if self.scale == 1.0 else gate * self.scale)
            elif self.scale != 1.0:
                hidden = hidden * self.scale
            return F.linear(hidden, self.B)
        mask = None if self._state is None else self._state.token_mask
        route = self.router(raw, mask)
        weights = route.weights if gate is None else route.weights * gate.to(route.weights.dtype)
        if route.keep is not None and self._state is not None and self._state.use_gather(x):
            return self._sparse(x, weights, route.keep)
        hidden = F.linear(x, self.A)
        weights = (weights if self.scale == 1.0 else weights * self.scale).to(hidden.dtype)
        return F.linear(weight_hidden(hidden, weights, self.rank, self.shared_a), self.B)

    def merged_weight(self) -> torch.Tensor:
        """The [out, in] weight delta of a single-expert LoRA (with its MoSLoRA mixer): (alpha/r) B M A.

        Adding it to the frozen weight gives the same outputs (eval mode: no dropout), so the adapter merges.
        """
        if self.router is not None:
            raise ValueError("a routed mixture of LoRA experts has no single weight delta to merge")
        a = self.A if self.mixer is None else self.mixer @ self.A
        return self.scale * (self.B @ a)

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Run each expert only on the tokens that selected it (Top-K / AdaMoLE sparse execution)."""
        flat = x.reshape(-1, x.shape[-1])
        w = weights.reshape(-1, self.num_experts).to(self.A.dtype)  # accumulate in the adapter dtype
        out = flat.new_zeros(flat.shape[0], self.B.shape[0], dtype=self.A.dtype)
        r = self.rank
        for e in range(self.num_experts):
            rows, n = padded_rows(keep[..., e])
            a = self.A if self.shared_a else self.A[e * r : (e + 1) * r]
            hidden = F.linear(flat[rows], a) * zero_padding(w[rows, e : e + 1] * self.scale, n)
            out.index_add_(0, rows, F.linear(hidden, self.B[:, e * r : (e + 1) * r]).to(out.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])  # explicit width: x may have no rows
