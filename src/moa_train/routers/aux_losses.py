"""Auxiliary router losses. Each returns a 0-dim tensor averaged over real (unpadded) tokens.

The model sums each kind over every router it has (all layers, all sites) and multiplies by the
router config's coefficient; coefficients default to 0 as in every official run.
"""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [N] over positions where mask [N] is 1."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def load_balance(probs: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch/Mixtral loss E · Σ_e f_e · P_e over tokens [N, E].

    f_e = share of (token, selected expert) assignments that went to e, P_e = mean routing probability.
    Equals 1 for perfectly uniform routing. With dense routing every expert is selected, f_e = 1/E and
    the loss is constant (no signal) — use it with a sparse selection.
    """
    num_experts = probs.shape[-1]
    assign = keep.to(probs.dtype)
    assign = assign / assign.sum(-1, keepdim=True).clamp_min(1.0)
    if mask is None:
        f = assign.mean(0)
        p = probs.mean(0)
    else:
        denom = mask.sum().clamp_min(1.0)
        f = (assign * mask[:, None]).sum(0) / denom
        p = (probs * mask[:, None]).sum(0) / denom
    return num_experts * (f * p).sum()  # f comes from a hard selection: gradient flows through P only


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(z)^2, keeps router logits small."""
    return _masked_mean(torch.logsumexp(logits.float(), dim=-1).square(), mask)


def entropy(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean entropy of the (normalised) gate distribution; a positive coefficient sharpens routing."""
    p = probs.float().clamp_min(1e-9)
    return _masked_mean(-(p * p.log()).sum(-1), mask)
