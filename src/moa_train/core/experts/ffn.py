"""Block-level FFN experts (MixLoRA; DynMoLE on the same experts): related-methods spec 2 and 7.

Expert i is the frozen FFN with its own LoRA triple on gate/up/down:
    FFN_i(x) = down_i(act(gate_i(x)) * up_i(x)),  proj_i(z) = W z + (alpha/r) B_i A_i dropout(z),
and ONE router per FFN mixes them: FFN(x) = sum_i w_i(x) FFN_i(x). Since the frozen down projection is
linear, sum_i w_i W_down h_i = W_down (sum_i w_i h_i): the base down projection runs once, on the mixed
hidden. The hooks (inject.py) do this without patching the MLP:
  * gate_proj / up_proj forward hooks hand their frozen outputs to ``remember`` (the x of gate_proj too);
  * a down_proj forward PRE-hook replaces its input by ``mixed_hidden()`` = sum_i w_i h_i;
  * a down_proj forward hook adds ``down_delta()`` = sum_i w_i (alpha/r) B_i A_i dropout(h_i).
With top-k routing (MixLoRA) only the k kept experts of a token are computed (see _mixed_top_k);
otherwise (DynMoLE, dense) every expert runs on every token and unselected ones get weight 0 (dense
masked compute, as in the DynMoLE release), so activation memory grows with E x the FFN width. With renormalised top-k weights (MixLoRA) the
output equals the frozen FFN at init (B = 0); with DynMoLE's unnormalised weights it is (sum_i w_i) x it.
FFN experts are not a slot of the block router: with one (e.g. MoA over q,k,v,o LoRA), it gates the
block's other experts and the FFN experts keep their own router.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.core.config import RouterConfig
from moa_train.core.routers import Router


class FFNExperts(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        rank: int,
        alpha: float,
        dropout: float,
        num_experts: int,
        router_cfg: RouterConfig,
        act_fn: nn.Module,
        state=None,
    ) -> None:
        super().__init__()
        self.rank, self.num_experts, self.scale = rank, num_experts, alpha / rank
        e, h, i = num_experts, hidden_size, intermediate_size
        # Expert e's A is rows [e*r, (e+1)*r) of each A, its B the matching columns of each B.
        self.gate_A = nn.Parameter(torch.empty(e * rank, h))
        self.up_A = nn.Parameter(torch.empty(e * rank, h))
        self.down_A = nn.Parameter(torch.empty(e * rank, i))
        self.gate_B = nn.Parameter(torch.zeros(i, e * rank))
        self.up_B = nn.Parameter(torch.zeros(i, e * rank))
        self.down_B = nn.Parameter(torch.zeros(h, e * rank))
        for a in (self.gate_A, self.up_A, self.down_A):
            for block in a.split(rank, 0):  # each expert gets the single-LoRA init (U(+-1/sqrt(in)))
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(hidden_size, num_experts, router_cfg, state)
        self._state = state
        self.__dict__["act_fn"] = act_fn  # the MLP's own activation (a plain reference, not a submodule)
        self.__dict__.update(
            _x=None, _base_gate=None, _base_up=None, _hidden=None, _weights=None, _blocks=None
        )

    def _per_expert(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B_e A_e x for every expert e: [..., E, out] from x [..., in] (dropout applied)."""
        hidden = F.linear(x, a).unflatten(-1, (self.num_experts, self.rank))  # [..., E, r]
        return (
            torch.einsum("...er,oer->...eo", hidden, b.unflatten(1, (self.num_experts, self.rank)))
            * self.scale
        )

    def remember(self, x: torch.Tensor | None = None, base_gate=None, base_up=None) -> None:
        """Keep the FFN input and the frozen gate/up outputs of the current forward (from the hooks)."""
        if x is not None:
            self.__dict__.update(_x=x, _base_gate=base_gate)
        if base_up is not None:
            self.__dict__["_base_up"] = base_up

    def mixed_hidden(self) -> torch.Tensor:
        """Route the FFN input and return sum_i w_i act(gate_i x) * up_i x [..., intermediate]."""
        x, state = self._x, self._state
        mask = None if state is None else state.token_mask
        weights = self.router(x, mask).weights  # [..., E]
        xa = self.dropout(x if x.dtype == self.gate_A.dtype else x.to(self.gate_A.dtype))
        if self.router.cfg.selection == "topk":
            return self._mixed_top_k(xa, weights, int(self.router.cfg.top_k))
        gate = self._base_gate.to(self.gate_A.dtype).unsqueeze(-2) + self._per_expert(
            xa, self.gate_A, self.gate_B
        )
        up = self._base_up.to(self.up_A.dtype).unsqueeze(-2) + self._per_expert(xa, self.up_A, self.up_B)
        hidden = self.act_fn(gate) * up  # [..., E, intermediate]
        weights = weights.to(hidden.dtype)
        self.__dict__.update(
            _hidden=hidden, _weights=weights, _blocks=None, _x=None, _base_gate=None, _base_up=None
        )
        return (hidden * weights.unsqueeze(-1)).sum(-2)

    def _mixed_top_k(self, xa: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k routing: the same sum over the k kept experts only (perf: [..., k, intermediate] tensors
        instead of [..., E, intermediate], E/k times less activation memory and elementwise work).

        Slot s of a token holds its s-th kept expert e: zeroing every block of A x but e's before the
        concatenated B gives B_e A_e x in one GEMM per slot, without gathering B_e per token."""
        kept, index = weights.topk(k, dim=-1)  # [..., k]: exactly the kept experts (their weights > 0)
        blocks = (
            F.one_hot(index, self.num_experts).to(xa.dtype).repeat_interleave(self.rank, -1)
        )  # [..., k, E*r]
        scale = self.scale

        def slot_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.linear(F.linear(xa, a).unsqueeze(-2) * blocks, b) * scale  # [..., k, out]

        gate = self._base_gate.to(self.gate_A.dtype).unsqueeze(-2) + slot_delta(self.gate_A, self.gate_B)
        up = self._base_up.to(self.up_A.dtype).unsqueeze(-2) + slot_delta(self.up_A, self.up_B)
        hidden = self.act_fn(gate) * up  # [..., k, intermediate]
        kept = kept.to(hidden.dtype)
        self.__dict__.update(
            _hidden=hidden, _weights=kept, _blocks=blocks, _x=None, _base_gate=None, _base_up=None
        )
        return (hidden * kept.unsqueeze(-1)).sum(-2)

    def down_delta(self) -> torch.Tensor:
        """sum_i w_i (alpha/r) B_i A_i dropout(h_i) [..., hidden] for the hidden of mixed_hidden()."""
        hidden, weights, blocks = self._hidden, self._weights, self._blocks
        self.__dict__.update(_hidden=None, _weights=None, _blocks=None)
        e, r = self.num_experts, self.rank
        if blocks is not None:  # top-k slots: keep each slot's own expert block of A_down h
            low = F.linear(self.dropout(hidden), self.down_A) * blocks  # [..., k, E*r]
            low = (low * (weights.unsqueeze(-1) * self.scale)).sum(-2)
            return F.linear(low, self.down_B)
        low = torch.einsum("...ei,eri->...er", self.dropout(hidden), self.down_A.unflatten(0, (e, r)))
        low = low * (weights.unsqueeze(-1) * self.scale)  # gate the rank-r hidden, not the output
        return F.linear(low.flatten(-2), self.down_B)
