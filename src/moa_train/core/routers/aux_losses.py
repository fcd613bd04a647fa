"""Auxiliary router losses. Each returns a 0-dim tensor averaged over real (unpadded) tokens.

By default (router.aux_pool=router) the model sums each kind over every router it has (all layers, all
sites) and multiplies by the router config's coefficient; coefficients default to 0 as in every
official run. Pooled losses (aux_pool=layer or model) are built from per-router sums instead
(``masked_sum``, ``assignment_counts``, ``probability_sums``) that the model adds up over the routers
of a pool before forming one loss (``ratio``, ``pooled_balance``).
"""

from __future__ import annotations

import torch

from moa_train.core.routers.dynmole import tsallis_entropy


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [N] over positions where mask [N] is 1."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of values [N] over real tokens, their number): the parts of a pooled mean."""
    if mask is None:
        return values.sum(), values.new_tensor(float(values.shape[0]))
    return (values * mask).sum(), mask.sum()


def ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A pooled mean from the summed parts of ``masked_sum``."""
    return total / count.clamp_min(1.0)


def _column_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of values [N, E] (real tokens only) -> [E]."""
    if mask is None:
        return values.mean(0)
    return (values * mask[:, None]).sum(0) / mask.sum().clamp_min(1.0)


def assignment_counts(
    keep: torch.Tensor, mask: torch.Tensor | None, norm: str = "spec", weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [E], tokens []) over real tokens, from which f_e = counts_e / tokens.

    norm="spec" (method spec C.8): each token spreads one unit over the experts it kept, so f_e is the
    share of (token, kept expert) assignments. norm="official": each kept expert counts 1, so f_e is
    the fraction of tokens that kept e (the official Top-K / AdaMoLE code; k x the spec value at top-k).
    norm="weights": each token adds its routing weights [N, E] (0 where not kept), with their gradient,
    so f_e is the mean weight of e (DynMoLE's release).
    """
    assign = weights.float() if norm == "weights" else keep.float()
    if norm == "spec":
        assign = assign / assign.sum(-1, keepdim=True).clamp_min(1.0)
    if mask is None:
        return assign.sum(0), assign.new_tensor(float(assign.shape[0]))
    mask = mask.float()
    return (assign * mask[:, None]).sum(0), mask.sum()


def mean_probability(
    probs: torch.Tensor, mask: torch.Tensor | None, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """P_e [E]: mean routing probability over real tokens; with an AdaMoLE threshold tau [N, 1] and the
    official normalisation, the mean of (p - tau) over all real tokens (not masked by the selection)."""
    return _column_mean(probs if threshold is None else probs - threshold, mask)


def probability_sums(
    probs: torch.Tensor, mask: torch.Tensor | None, threshold: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over real tokens of the probabilities [E] (minus AdaMoLE's tau when given), their number)."""
    values = probs.float() if threshold is None else (probs - threshold).float()
    if mask is None:
        return values.sum(0), values.new_tensor(float(values.shape[0]))
    return (values * mask[:, None]).sum(0), mask.sum()


def balance_from(
    counts: torch.Tensor, tokens: torch.Tensor, mean_prob: torch.Tensor, detach: bool = True
) -> torch.Tensor:
    """Switch/Mixtral loss E * sum_e f_e P_e with f_e = counts_e / tokens (no gradient through f unless
    ``detach`` is False: balance_norm=weights)."""
    if detach:
        counts, tokens = counts.detach(), tokens.detach()
    f = counts / tokens.clamp_min(1.0)
    return mean_prob.shape[-1] * (f * mean_prob).sum()


def pooled_balance(
    counts: torch.Tensor, tokens: torch.Tensor, prob_sum: torch.Tensor, prob_tokens: torch.Tensor
) -> torch.Tensor:
    """The balance loss of a pool of routers from their summed parts: f and P are each averaged over every
    (router, token) row of the pool before the product, as when the releases concatenate all routers'
    logits (MoE-PEFT: one loss over all layers; MoLA: one per layer over its sites). The parts carry
    gradient only where they should (counts are detached unless balance_norm=weights)."""
    return balance_from(counts, tokens, prob_sum / prob_tokens.clamp_min(1.0), detach=False)


def load_balance(
    probs: torch.Tensor,
    keep: torch.Tensor,
    mask: torch.Tensor | None,
    norm: str = "spec",
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral loss E · Σ_e f_e · P_e over tokens [N, E] of one forward.

    norm="spec": f_e = share of (token, selected expert) assignments that went to e, P_e = mean routing
    probability; equals 1 for perfectly uniform routing. norm="official": see assignment_counts and
    mean_probability (``threshold``: AdaMoLE's tau, used only with norm="official"). With dense routing
    every expert is selected, f_e = 1/E and the loss is constant (no signal): use a sparse selection.
    """
    counts, tokens = assignment_counts(keep, mask, norm)
    mean_prob = mean_probability(probs, mask, threshold if norm == "official" else None)
    return balance_from(counts, tokens, mean_prob)


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean of logsumexp(z)^2, keeps router logits small."""
    return _masked_mean(torch.logsumexp(logits.float(), dim=-1).square(), mask)


def entropy(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean entropy of the (normalised) gate distribution; a positive coefficient sharpens routing."""
    p = probs.float().clamp_min(1e-9)
    return _masked_mean(-(p * p.log()).sum(-1), mask)


def tsallis(probs: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """Mean normalised Tsallis entropy (index q) of the routing distributions (DynMoLE's entropy loss)."""
    return _masked_mean(tsallis_entropy(probs, q), mask)


def shannon(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy [N] of the (normalised) gate distributions [N, E]."""
    p = probs.float().clamp_min(1e-9)
    return -(p * p.log()).sum(-1)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var / mean^2 of all entries (unbiased variance; 0 for one entry)."""
    values = values.float().reshape(-1)
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + 1e-10)


def localized_balance(
    weights: torch.Tensor, mask: torch.Tensor | None, task_types: torch.Tensor, alpha: float
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint: CV^2 of per-example expert importance.

    weights [B, T, E] (dense routing weights), mask [B, T] real tokens (None: every position, as the
    release sums them), task_types [B] in {0, 1}. The importance of expert e for example b is the sum
    over its tokens of w[b, t, e], times 1 + alpha when e lies in the half of the experts given to b's
    task type (as released: the first half to type 1, e.g. world knowledge; the second half to type 0),
    else 1 - alpha. With alpha = 0 this is the plain importance CV^2 balance.
    """
    w = weights.float()
    importance = (w if mask is None else w * mask.float().unsqueeze(-1)).sum(1)  # [B, E]
    num = w.shape[-1]
    half = (torch.arange(num, device=w.device) < num // 2).long()  # expert -> the task type it serves
    match = half.unsqueeze(0) == task_types.long().unsqueeze(1)  # [B, E]
    factor = torch.where(match, 1.0 + alpha, 1.0 - alpha)
    return cv_squared(importance * factor)
