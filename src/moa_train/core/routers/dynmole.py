"""DynMoLE routing (related-methods spec 2): top-p with a floor of keep_top_k experts, and every expert for
tokens whose routing distribution is too uncertain (normalised Tsallis entropy above a threshold).

Weights are ``p * keep`` (not renormalised), as in the released code.
"""

from __future__ import annotations

import torch


def tsallis_entropy(probs: torch.Tensor, q: float, eps: float = 0.0) -> torch.Tensor:
    """Normalised Tsallis entropy of distributions [..., N]: H_q(p) / H_q(uniform), in [0, 1].

    H_q(p) = (1 - sum_i p_i^q) / (q - 1) and its maximum (1 - N^(1-q)) / (q - 1); the (q - 1) cancels.
    ``eps`` is added to every p_i first, as DynMoLE's release does (its default 1e-5).
    """
    n = probs.shape[-1]
    p = probs.float() if eps == 0.0 else probs.float() + eps
    return (1.0 - p.pow(q).sum(-1)) / (1.0 - n ** (1.0 - q))


def dynmole(
    probs: torch.Tensor, top_p: float, keep_top_k: int, q: float, threshold: float, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep) for probabilities [..., N].

    Sorted descending, an expert is kept while the cumulative probability up to and including it is
    <= top_p, and the first keep_top_k are always kept; a token with tsallis_entropy(eps) > threshold
    keeps every expert ("broadcast"; never with threshold 1, as in the release). Branch-free (masks
    only), so it compiles without graph breaks.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    position = torch.arange(probs.shape[-1], device=probs.device)
    keep_sorted = (sorted_probs.cumsum(-1) <= top_p) | (position < keep_top_k)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if threshold < 1.0:
        keep = keep | (tsallis_entropy(probs, q, eps) > threshold).unsqueeze(-1)
    return probs * keep.to(probs.dtype), keep
