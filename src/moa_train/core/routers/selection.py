"""Which experts a token keeps, and with what weight (method spec B.2 and C.8-C.9).

Every function takes router logits/probabilities of shape [..., E] and returns (weights, keep) where
``keep`` is a bool mask and ``weights`` is zero wherever ``keep`` is False.
"""

from __future__ import annotations

import torch


def learned_threshold(
    gates: torch.Tensor, threshold: torch.Tensor, grad: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MoA: keep expert e when g_e >= Γ; kept gates are not renormalised.

    grad="none" reproduces the official code: weights g·m, so Γ only enters a comparison and gets no
    gradient. "shifted" uses (g-Γ)·m (AdaMoLE-style), which trains Γ. "ste" keeps the forward value g·m
    and passes a straight-through gradient d(g·m)/dΓ = -g to the threshold.
    """
    keep = gates >= threshold
    mask = keep.to(gates.dtype)
    if grad == "none":
        return gates * mask, keep
    if grad == "shifted":
        return (gates - threshold) * mask, keep
    surrogate = gates - threshold  # identity surrogate of the step function
    return gates * (mask + surrogate - surrogate.detach()), keep


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest probabilities and renormalise them to sum 1 (Top-K MoE-LoRA, MixLoRA)."""
    values, index = probs.topk(k, dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, True)
    weights = torch.zeros_like(probs).scatter(-1, index, values / values.sum(-1, keepdim=True))
    return weights, keep


def top_p(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the smallest set of experts whose probability mass reaches p (at least one), renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < p  # the first expert always has mass_before = 0
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep.to(probs.dtype)
    return kept / kept.sum(-1, keepdim=True), keep


def adamole(probs: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaMoLE: keep p_i >= τ, weights (p_i - τ) renormalised to sum 1; all-zero rows stay 0."""
    keep = probs >= threshold
    shifted = (probs - threshold) * keep.to(probs.dtype)
    total = shifted.sum(-1, keepdim=True)
    return shifted / torch.where(total > 0, total, torch.ones_like(total)), keep
