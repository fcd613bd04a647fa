"""Zero-gated prompt expert, LLaMA-Adapter style (method spec A.3); E > 1 is prompt-MoE (spec C.2).

Per layer: L learnable vectors P. Keys/values come from the frozen base k/v projections of P (no
LoRA, no RoPE; through k_norm on Qwen3), repeated over kv groups. Each post-RoPE query attends to the
L slots with its own softmax (not joined with the causal softmax), times a per-head gate that starts at
0, so the expert contributes nothing at init. The result is added to the attention output before
o_proj. Prompt keys/values are rebuilt every call and never enter the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.config import RouterConfig
from moa_train.routers import Router


class PromptExpert(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        length: int,
        num_experts: int = 1,
        router_cfg: RouterConfig | None = None,
        state=None,
    ) -> None:
        super().__init__()
        self.length, self.num_experts = length, num_experts
        self.vectors = nn.Parameter(torch.randn(num_experts * length, hidden_size))  # nn.Embedding init
        self.head_gate = nn.Parameter(torch.zeros(num_experts, num_heads))
        self._state = state
        self.router = Router(hidden_size, num_experts, router_cfg, state) if num_experts > 1 else None

    def forward(
        self, attn: nn.Module, query: torch.Tensor, router_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query: [B, heads, T, head_dim] after RoPE. Returns [B, T, heads, head_dim]."""
        heads, head_dim = query.shape[1], query.shape[-1]
        weight_k = attn.k_proj.weight
        prompt = self.vectors.to(weight_k.dtype)
        # F.linear on the frozen weights, not the modules: the k/v LoRA hooks must not apply here.
        keys = F.linear(prompt, weight_k, attn.k_proj.bias).unflatten(-1, (-1, head_dim))
        values = F.linear(prompt, attn.v_proj.weight, attn.v_proj.bias).unflatten(-1, (-1, head_dim))
        if getattr(attn, "k_norm", None) is not None:
            keys = attn.k_norm(keys)
        groups = heads // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1).permute(1, 0, 2)  # [heads, E*L, hd]
        values = values.repeat_interleave(groups, dim=1).permute(1, 0, 2)
        scores = torch.matmul(query, keys.transpose(-1, -2).to(query.dtype)) * attn.scaling  # [B,h,T,E*L]
        scores = scores.unflatten(-1, (self.num_experts, self.length))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        values = values.unflatten(1, (self.num_experts, self.length)).to(query.dtype)  # [h, E, L, hd]
        out = torch.einsum("bhtel,held->bhted", probs, values)
        out = out * self.head_gate.t().to(out.dtype)[None, :, None, :, None]
        if self.router is None:
            return out[..., 0, :].transpose(1, 2)
        mask = None if self._state is None else self._state.token_mask
        weights = self.router(router_input, mask).weights.to(out.dtype)  # [B, T, E]
        return torch.einsum("bhted,bte->bthd", out, weights)
