"""LoRA on the routed experts of an MoE base (Qwen3-MoE, Mixtral, OLMoE): every base expert e gets its
own low-rank deltas on its fused gate/up projection and its down projection,
    gate_up_e(x) = W_gu[e] x + (alpha/r) B_gu[e] A_gu[e] x,   down_e(h) = W_d[e] h + (alpha/r) B_d[e] A_d[e] h,
applied inside the base's expert computation; the base router (its top-k choice, its weights and its
auxiliary loss) is untouched, so the delta of a token is routed exactly as the frozen experts are.

Current transformers stores an MoE block's experts as fused 3-D tensors behind an "experts
implementation" interface (``ALL_EXPERTS_FUNCTIONS``, as attention has ``ALL_ATTENTION_FUNCTIONS``).
``register`` adds ``moa_<impl>`` there: experts modules with a ``RoutedLoRA`` attached run
``routed_forward`` (the per-expert loop of the eager implementation plus the deltas); every other
experts module keeps the base implementation. B = 0 at init, so the output equals the base's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.errors import MoATrainError

PREFIX = "moa_"


class RoutedLoRA(nn.Module):
    def __init__(self, experts: nn.Module, rank: int, alpha: float, dropout: float = 0.0, state=None) -> None:
        super().__init__()
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
            raise MoATrainError(
                f"{type(experts).__name__}: LoRA on routed experts needs gated experts (a fused gate_up_proj) "
                "without a post-expert norm"
            )
        gate_up, down = experts.gate_up_proj, experts.down_proj
        transposed = bool(getattr(experts, "is_transposed", False))
        # [E, out, in] (or [E, in, out] when transposed)
        e, gu_out, hidden = (
            gate_up.shape if not transposed else (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1])
        )
        inter = down.shape[2] if not transposed else down.shape[1]
        self.num_experts, self.rank, self.scale = e, rank, alpha / rank
        self.gate_up_A = nn.Parameter(torch.empty(e, rank, hidden))
        self.gate_up_B = nn.Parameter(torch.zeros(e, gu_out, rank))
        self.down_A = nn.Parameter(torch.empty(e, rank, inter))
        self.down_B = nn.Parameter(torch.zeros(e, hidden, rank))
        for a in (self.gate_up_A, self.down_A):
            for block in a:  # each expert gets the single-LoRA init (nn.Linear's: U(+-1/sqrt(in)))
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._state = state

    def delta(self, x: torch.Tensor, expert: int, which: str) -> torch.Tensor:
        """(alpha/r) B_e A_e dropout(x) for expert ``expert`` at ``which`` (gate_up | down)."""
        a, b = getattr(self, f"{which}_A")[expert], getattr(self, f"{which}_B")[expert]
        x = self.dropout(x.to(a.dtype))
        return F.linear(F.linear(x, a) * self.scale, b)

    def merged(self, which: str) -> torch.Tensor:
        """(alpha/r) B A per expert [E, out, in]: adding it to the base weights gives the same outputs."""
        a, b = getattr(self, f"{which}_A"), getattr(self, f"{which}_B")
        return self.scale * torch.bmm(b, a)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def routed_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward with each expert's LoRA deltas: per hit expert, its tokens' gate/up, gate, down
    (with deltas), weighted by the base router and summed, as the eager implementation does."""
    lora: RoutedLoRA | None = self.__dict__.get("_moa_routed")
    base = _base_forward(self)
    if lora is None or (lora._state is not None and not lora._state.enabled):
        return base(self, hidden_states, top_k_index, top_k_weights)
    transposed, has_bias = bool(getattr(self, "is_transposed", False)), bool(getattr(self, "has_bias", False))
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index.clamp(max=self.num_experts), self.num_experts + 1).permute(2, 1, 0)
        hit = (mask[: self.num_experts].sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        position, token = torch.where(mask[e])
        x = hidden_states[token]
        bias = self.gate_up_proj_bias[e] if has_bias else None
        gate_up = _linear(x, self.gate_up_proj[e], bias, transposed)
        gate_up = gate_up + lora.delta(x, e, "gate_up").to(gate_up.dtype)
        h = self._apply_gate(gate_up)
        bias = self.down_proj_bias[e] if has_bias else None
        y = _linear(h, self.down_proj[e], bias, transposed)
        y = y + lora.delta(h, e, "down").to(y.dtype)
        y = y * top_k_weights[token, position, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _base_forward(module: nn.Module):
    impl = module.config._experts_implementation.removeprefix(PREFIX)
    if impl == "eager":
        return type(module).forward.__wrapped__  # use_experts_implementation keeps the original forward there
    # deferred: keeps the expert modules transformers-free; only fused-experts models need it
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[impl]


def register(model: nn.Module) -> None:
    """Route the model's experts modules through ``routed_forward`` (``moa_<impl>``)."""
    # deferred: keeps the expert modules transformers-free; only fused-experts models need it
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    config = model.config
    current = getattr(config, "_experts_implementation", None) or "eager"
    if current.startswith(PREFIX):
        return
    ALL_EXPERTS_FUNCTIONS.register(PREFIX + current, routed_forward)
    config._experts_implementation = PREFIX + current


def unregister(model: nn.Module) -> None:
    impl = getattr(model.config, "_experts_implementation", None)
    if impl and impl.startswith(PREFIX):
        model.config._experts_implementation = impl.removeprefix(PREFIX)
