"""Zero-gated prompt expert, LLaMA-Adapter style (method spec A.3); E > 1 is prompt-MoE (spec C.2:
by default the official form, one softmax over all E*L slots and one per-head gate for all groups).

Per layer: L learnable vectors P. Keys/values come from the frozen base k/v projections of P (no
LoRA, no RoPE; the slices of a fused projection; through the family's k norm, per head as in Qwen3 /
Gemma 3 or full width as in OLMo 2), repeated over kv groups. Each post-RoPE query attends to the
L slots with its own softmax (not joined with the causal softmax), with the family's score scale and
logit soft-cap (Gemma 2), times a per-head gate that starts at 0, so the expert contributes nothing at
init. The slots have no position, so sliding windows do not hide them. The result is added to the
attention output before o_proj. Prompt keys/values are rebuilt every call and never enter the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from moa_train.core.config import RouterConfig
from moa_train.core.families import AttentionView
from moa_train.core.ops import autocast_off, few_rows_on_cpu
from moa_train.core.routers import Router


class PromptExpert(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        length: int,
        num_experts: int = 1,
        router_cfg: RouterConfig | None = None,
        state=None,
        moe_form: str = "official",
    ) -> None:
        super().__init__()
        self.length, self.num_experts = length, num_experts
        # prompt-MoE (spec C.2): "official" takes ONE softmax over all E*L slots and ONE per-head gate
        # shared by the groups; "per_group" a softmax and a per-head gate per group.
        self.joint = moe_form == "official"
        self.vectors = nn.Parameter(torch.randn(num_experts * length, hidden_size))  # nn.Embedding init
        self.head_gate = nn.Parameter(torch.zeros(1 if self.joint else num_experts, num_heads))
        self._state = state
        self.router = Router(hidden_size, num_experts, router_cfg, state) if num_experts > 1 else None

    def forward(
        self,
        attn: AttentionView,
        query: torch.Tensor,
        router_input: torch.Tensor | None = None,
        token_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attn: the family view of the layer's attention (families.AttentionView); query: [B, heads, T, head_dim] after RoPE; token_gate: [B, T, 1] block-router gate or None.

        Returns ``token_gate * prompt_attention`` as [B, T, heads, head_dim].

        Perf: the head gates, the prompt-MoE routing weights and the token gate all scale the attention
        probabilities [B, heads, T, E*L] (L = 10 slots) before the product with the values, instead of the
        [B, heads, T, head_dim] output — the same sum, on ~head_dim/L times fewer elements, and one matmul
        over all E*L slots instead of an einsum per expert. Prompt keys/values are reused across calls
        while no gradient is recorded (decoding) and the prompt and projections are unchanged.
        """
        if few_rows_on_cpu(query, query.shape[0] * query.shape[2]):  # decoding on CPU (see FEW_ROWS)
            with autocast_off():
                return self._forward(attn, query.float(), router_input, token_gate)
        return self._forward(attn, query, router_input, token_gate)

    def _forward(self, attn, query, router_input, token_gate) -> torch.Tensor:
        heads = query.shape[1]
        keys_t, values = self._keys_values(attn, heads, query.shape[-1], query.dtype)
        if query.shape[2] == 1 and self.router is None and not torch.is_grad_enabled():
            return self._decode_step(query, keys_t, values, token_gate, attn.softcap)
        scores = _softcap(torch.matmul(query, keys_t), attn.softcap)  # [B, h, T, E*L], scaled by attn.scaling
        # Perf: the softmax runs on the scores laid out [B, h, E*L, T] (slots before tokens), i.e. over a
        # strided dim with T contiguous inner elements: ~20x faster on CPU than over a contiguous last dim
        # of size L = 10 (one tiny row per token). The transpose is taken after the matmul with the query
        # (not by multiplying with a transposed query), so the query's gradient stays contiguous for
        # RoPE's backward and its accumulation with the attention's query gradient.
        scores = scores.transpose(-1, -2).to(torch.float32, memory_format=torch.contiguous_format)
        if self.joint:  # one softmax over all E*L slots, then split into the E groups
            probs = torch.softmax(scores, dim=2).unflatten(2, (self.num_experts, self.length))  # [B,h,E,L,T]
        else:
            probs = torch.softmax(scores.unflatten(2, (self.num_experts, self.length)), dim=3)
        coef = self.head_gate.t()[:, :, None, None]  # [h, E or 1 (shared), 1, 1]
        if self.router is not None:
            mask = None if self._state is None else self._state.token_mask
            weights = self.router(router_input, mask).weights  # [B, T, E]
            coef = coef * weights.transpose(1, 2)[:, None, :, None, :]  # [B, h, E, 1, T]
        if token_gate is not None:  # [B, T or 1, 1] gate column -> [B, 1, 1, 1, T or 1]
            coef = coef * token_gate.view(token_gate.shape[0], 1, 1, 1, token_gate.shape[1])
        probs = (probs * coef).flatten(2, 3).to(query.dtype)  # fp32 products, then [B, h, E*L, T]
        out = torch.matmul(probs.transpose(-1, -2), values)  # [B, h, T, hd]
        return out.transpose(1, 2)

    def _decode_step(self, query, keys_t, values, token_gate, softcap=None) -> torch.Tensor:
        """One new token per sequence, no gradient: the same sums as _forward in about half the ops (perf:
        decoding runs this once per layer and token, where the per-op overhead dominates)."""
        # heads as the bmm batch and the B tokens as rows: the [heads, ...] prompt keys/values are used as
        # they are, where a [B, heads, 1, hd] query would make matmul broadcast (copy) them B times
        q = query[:, :, 0].transpose(0, 1)  # [h, B, hd]
        probs = torch.softmax(_softcap(torch.bmm(q, keys_t), softcap).float(), dim=-1)  # [h, B, L]
        coef = self.head_gate[0][:, None, None]  # [h, 1, 1]
        if token_gate is not None:  # [B, 1, 1] gate column
            coef = coef * token_gate.view(1, -1, 1)
        out = torch.bmm((probs * coef).to(query.dtype), values)  # [h, B, hd]
        return out.transpose(0, 1).unsqueeze(1)  # [B, 1, h, hd]

    def _keys_values(
        self, attn: AttentionView, heads: int, head_dim: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys, transposed and pre-multiplied by the score scale [heads, head_dim, E*L], and values
        [heads, E*L, head_dim], in ``dtype``, from the frozen k/v projections."""
        weight_k = attn.k_proj.weight
        # not while compiling: the cache key reads storage pointers (a graph break); a compiled decode step
        # recomputes the 10 prompt rows inside its graph instead
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            device = weight_k.device.type
            key = (
                self.vectors._version,
                self.vectors.data_ptr(),
                attn.versions(),  # the k/v weights and the k norm
                heads,
                id(attn),
                dtype,
                attn.scaling,
                torch.is_autocast_enabled(device),
                torch.get_autocast_dtype(device),
            )
            cached = self.__dict__.get("_kv_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        prompt = self.vectors.to(_input_dtype(attn.k_proj, dtype))
        # The projections' own forward (the quantized kernels of a 4-/8-bit base included), called directly:
        # forward() bypasses the module's hooks, so the k/v LoRA experts do not apply to the prompt.
        keys, values = attn.keys_values(prompt)  # [E*L, kv_heads, head_dim]
        groups = heads // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1).permute(1, 2, 0)  # [heads, hd, E*L]
        values = values.repeat_interleave(groups, dim=1).permute(1, 0, 2).to(dtype)  # [heads, E*L, hd]
        # scale the 10-slot keys rather than the [B, h, T, E*L] scores (an exact power of two for hd = 64)
        keys = (keys * attn.scaling).to(dtype)
        if cacheable:
            self.__dict__["_kv_cache"] = (key, (keys, values))  # plain attribute: not a buffer, not saved
        elif not torch.compiler.is_compiling():
            self.__dict__.pop("_kv_cache", None)
        return keys, values


def _softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The family's attention-logit soft-cap (Gemma 2): cap * tanh(scores / cap)."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def _input_dtype(proj: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype a k/v projection takes: its weights' for a plain Linear, the compute dtype of a 4-bit
    layer (whose weight dtype is only the packed storage), ``fallback`` for int8 weights."""
    compute = getattr(proj, "compute_dtype", None)
    if compute is not None:
        return compute
    return proj.weight.dtype if proj.weight.is_floating_point() else fallback
