"""Parallel adapter on the FFN (method spec A.2): PA(u) = W_up act(W_down u + b_down) + b_up.

Input u is the FFN-norm output (what the MLP consumes); the output is added to the MLP output. Both
weights are Xavier-uniform with gain 1e-4 (near zero, not exactly zero), biases zero. E > 1 is PA-MoE
(E up-projections, optionally one shared down-projection) with a softmax site router (spec C.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.core.config import RouterConfig
from moa_train.core.ops import autocast_off, autocasting, few_rows_on_cpu, weight_hidden
from moa_train.core.routers import Router

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class ParallelAdapter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        activation: str = "silu",
        init_gain: float = 1e-4,
        num_experts: int = 1,
        shared_down: bool = False,
        router_cfg: RouterConfig | None = None,
        state=None,
    ) -> None:
        super().__init__()
        self.bottleneck, self.num_experts = bottleneck, num_experts
        self.shared_down = shared_down and num_experts > 1
        self.act = ACTIVATIONS[activation]
        self._state = state
        n_down = 1 if (self.shared_down or num_experts == 1) else num_experts
        self.down_w = nn.Parameter(torch.empty(bottleneck * n_down, hidden_size))
        self.down_b = nn.Parameter(torch.zeros(bottleneck * n_down))
        self.up_w = nn.Parameter(torch.empty(hidden_size, bottleneck * num_experts))
        self.up_b = nn.Parameter(torch.zeros(num_experts, hidden_size))
        # Xavier per expert block so every expert gets the single-adapter init.
        for block in self.down_w.split(bottleneck, 0):
            nn.init.xavier_uniform_(block, gain=init_gain)
        for block in self.up_w.split(bottleneck, 1):
            nn.init.xavier_uniform_(block, gain=init_gain)
        self.router = Router(hidden_size, num_experts, router_cfg, state) if num_experts > 1 else None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.delta(u)

    def delta(self, u: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``gate * PA(u)`` [..., hidden] for a per-token gate column [..., 1] (None: ungated).

        Perf: the gate (and the PA-MoE routing weights) multiply the bottleneck, not the [tokens, hidden]
        output, and the up-bias rides along as one extra bottleneck column (g*(W h + b) = [W, b] [g h; g]),
        so gating costs ops on width bottleneck+1 instead of hidden, forward and backward. No fp32
        upcast of the input under autocast (F.linear casts to the autocast dtype anyway; same values).
        """
        if few_rows_on_cpu(u):  # decoding on CPU: fp32 without autocast is faster (see FEW_ROWS)
            with autocast_off():
                return self._delta(u, gate)
        return self._delta(u, gate)

    def _delta(self, u: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        u = u if autocasting(u) else u.to(self.down_w.dtype)
        hidden = self.act(F.linear(u, self.down_w, self.down_b))
        if self.router is None:
            if gate is None:
                return F.linear(hidden, self.up_w, self.up_b[0])
            g = gate if gate.dtype == hidden.dtype else gate.to(hidden.dtype)
            if not torch.is_grad_enabled():  # inference: fewest ops (decoding, T = 1)
                return F.linear(hidden, self.up_w, self.up_b[0]) * g
            g = g.expand(*hidden.shape[:-1], 1)  # instance gates are [B, 1, 1]
            return F.linear(torch.cat([hidden * g, g], -1), torch.cat([self.up_w, self.up_b[0][:, None]], 1))
        mask = None if self._state is None else self._state.token_mask
        w = self.router(u, mask).weights.to(hidden.dtype)
        if gate is not None:
            w = w * gate.to(w.dtype)
        mixed = weight_hidden(hidden, w, self.bottleneck, self.shared_down)
        return F.linear(torch.cat([mixed, w], -1), torch.cat([self.up_w, self.up_b.t()], 1))
