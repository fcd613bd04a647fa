"""Router: gate network (linear / SwiGLU / none) -> activation -> selection, plus aux losses and telemetry."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moa_train.core.config import RouterConfig
from moa_train.core.ops import autocast_off, few_rows_on_cpu
from moa_train.core.routers import aux_losses, selection
from moa_train.core.routers.dynmole import dynmole, tsallis_entropy
from moa_train.core.telemetry import RouterTelemetry, in_backward
from moa_train.errors import MoATrainError


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


class RouterOutput:
    """weights [..., E]: what each expert's output is multiplied by (0 where not kept); keep [..., E]: bool,
    None for dense routing (every expert runs); probs [..., E]: normalised gate distribution (entropy,
    load balance); threshold [..., 1]: Γ or τ, when the selection has one.

    Perf: for sigmoid / constant gates ``probs`` (gates / their sum) is only needed by telemetry and aux
    losses, so it is computed on first access from ``gates`` instead of on every forward (decoding runs
    with telemetry off).
    """

    __slots__ = ("weights", "keep", "threshold", "_probs", "_gates")

    def __init__(self, weights, keep, probs, threshold, gates=None) -> None:
        self.weights, self.keep, self.threshold = weights, keep, threshold
        self._probs, self._gates = probs, gates

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = self._gates / self._gates.sum(-1, keepdim=True)
        return self._probs


class SwiGLUGate(nn.Module):
    """z = W2(SiLU(W1 x + b1) * (W3 x + b3)) + b2 with zero-initialised biases (spec B.1, swi_x > 0)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden, bias=bias)
        self.w3 = nn.Linear(in_features, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, out_features, bias=bias)
        if bias:
            for lin in (self.w1, self.w3, self.w2):
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1, self.w3, self.w2
        if not torch.is_grad_enabled():  # inference: fewest calls beat one pass over x (decoding, T = 1)
            hidden = F.silu(F.linear(x, w1.weight, w1.bias)) * F.linear(x, w3.weight, w3.bias)
            return F.linear(hidden, w2.weight, w2.bias)
        # Perf: W1 and W3 read the same x, so in training they run as one GEMM on the stacked weights
        # (one pass over x forward, one input-gradient GEMM and no gradient add backward); same sums.
        bias = None if w1.bias is None else torch.cat([w1.bias, w3.bias])
        gate, up = F.linear(x, torch.cat([w1.weight, w3.weight]), bias).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2.weight, w2.bias)


class Router(nn.Module):
    """Gates for ``num_experts`` experts from an input of width ``in_features``."""

    def __init__(self, in_features: int, num_experts: int, cfg: RouterConfig, state=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        self._state = state  # shared MoAState (python object, not a module)
        if cfg.kind == "linear":
            self.net = nn.Linear(in_features, num_experts, bias=cfg.bias)
            if cfg.init_std is not None:  # MixLoRA's router: normal(0, router_init_range)
                nn.init.normal_(self.net.weight, mean=0.0, std=cfg.init_std)
        elif cfg.kind == "swiglu":
            self.net = SwiGLUGate(in_features, cfg.hidden_mult * num_experts, num_experts, cfg.bias)
        else:
            self.net = None
        learned = (cfg.selection == "threshold" and not cfg.const_threshold) or cfg.selection == "adamole"
        self.threshold = nn.Linear(in_features, 1) if learned else None
        self.telemetry = RouterTelemetry(num_experts)
        self.layer_index: int | None = None  # set by MoAModel: the pool key of aux_pool=layer

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """x: [..., in]; mask: [...] real-token weights (padding 0) for statistics and aux losses."""
        if few_rows_on_cpu(x):  # decoding on CPU: fp32 without autocast is faster (see FEW_ROWS)
            with autocast_off():
                return self._forward(x, mask)
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> RouterOutput:
        cfg, num = self.cfg, self.num_experts
        if self.net is None:  # naive composition: every expert at full weight
            ones = x.new_ones(*x.shape[:-1], num)
            out = RouterOutput(ones, None, None, None, gates=ones)
            self.record(out, mask)
            return out
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts x itself (perf)
            x = x.to(self._param_dtype())
        logits = self.net(x)
        if cfg.activation == "sigmoid":
            gates = torch.sigmoid(logits)
            probs = None  # gates / gates.sum(-1): computed on demand (RouterOutput.probs)
        else:
            probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
            gates = probs * num if cfg.activation == "scaled_softmax" else probs

        threshold = None
        if cfg.selection == "dense":
            weights, keep = gates, None
        elif cfg.selection == "threshold":
            if self.threshold is None:
                threshold = gates.new_full((*gates.shape[:-1], 1), cfg.max_threshold)
            else:
                threshold = cfg.max_threshold * torch.sigmoid(self.threshold(x))
            weights, keep = selection.learned_threshold(gates, threshold, cfg.threshold_grad)
        elif cfg.selection == "topk":
            weights, keep = selection.top_k(probs, cfg.top_k)
        elif cfg.selection == "topp":
            weights, keep = selection.top_p(probs, cfg.top_p)
        elif cfg.selection == "dynmole":
            weights, keep = dynmole(
                probs, cfg.top_p, cfg.keep_top_k, cfg.entropy_index, cfg.entropy_threshold, cfg.entropy_eps
            )
        else:  # adamole: τ = (1/E) σ(w·x + b)
            threshold = torch.sigmoid(self.threshold(x)) / num
            weights, keep = selection.adamole(probs, threshold)

        out = RouterOutput(weights, keep, probs, threshold, gates=gates)
        self._aux(logits, out, mask)
        self.record(out, mask)
        return out

    def record(self, out: RouterOutput, mask: torch.Tensor | None) -> None:
        state = self._state
        if state is not None and state.collect_stats and not in_backward():
            self.telemetry.update(out.weights, out.keep, out.probs, out.threshold, mask)
        if state is not None and state.capture is not None and not in_backward():
            if state.capture_only is None or id(self) in state.capture_only:
                state.capture.append(out.weights.detach())

    def _aux(self, logits: torch.Tensor, out: RouterOutput, mask: torch.Tensor | None) -> None:
        """Aux losses only when a coefficient asks for them and gradients are on (training).

        A site router runs inside the decoder layer, so non-reentrant activation checkpointing replays it
        in backward; that replay must run the same tensor ops as the forward (it has to save the same
        tensors, else torch raises CheckpointError), so the losses are computed there too and only
        recording them is skipped: each aux loss counts once, from the forward."""
        cfg, state = self.cfg, self._state
        if state is None or not torch.is_grad_enabled():
            return
        record = not in_backward()
        num = self.num_experts
        flat_mask = None if mask is None else mask.reshape(-1).to(logits.dtype)
        if flat_mask is not None and flat_mask.numel() != logits.reshape(-1, num).shape[0]:
            flat_mask = None  # instance-level routers pool the mask away
        padded = cfg.aux_include_padding

        def mask_of(name: str) -> torch.Tensor | None:
            return None if name in padded else flat_mask

        # (name, parts, finish, coef): loss = finish(*parts); pooled routers add up their parts first
        terms: list[tuple[str, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], float]] = []
        if cfg.load_balance_coef:
            parts, finish = self._balance(out, mask_of("load_balance"), record)
            terms.append(("load_balance", parts, finish, cfg.load_balance_coef))

        def token_mean(name: str, values: torch.Tensor, coef: float) -> None:
            """A per-token loss averaged over the (masked) tokens: pooled as (sum, count) parts."""
            terms.append((name, aux_losses.masked_sum(values, mask_of(name)), aux_losses.ratio, coef))

        if cfg.z_loss_coef:
            values = torch.logsumexp(logits.reshape(-1, num).float(), dim=-1).square()
            token_mean("z_loss", values, cfg.z_loss_coef)
        if cfg.entropy_coef:
            probs = out.probs.reshape(-1, num)
            if cfg.selection == "dynmole":  # DynMoLE minimises the entropy it routes by
                values = tsallis_entropy(probs, cfg.entropy_index, cfg.entropy_eps)
            else:
                values = aux_losses.shannon(probs)
            token_mean("entropy", values, cfg.entropy_coef)
        if cfg.lbc_coef:
            if state.task_types is None:
                raise MoATrainError(
                    "router.lbc_coef > 0 needs each example's task type: set data.task_type_field or "
                    "data.task_types (see docs/experiments.md)"
                )
            weights = out.weights.reshape(-1, *out.weights.shape[-2:])  # [B, T, E]
            token_mask = None if mask is None or "lbc" in padded else mask.reshape(weights.shape[:2])
            loss = aux_losses.localized_balance(weights, token_mask, state.task_types, cfg.lbc_alpha)
            terms.append(("lbc", (loss,), _identity, cfg.lbc_coef))  # always per router (LoRAMoE)
        pool = self._pool_key()
        for name, parts, finish, coef in terms:
            if pool is None or name == "lbc":
                loss = finish(*parts)  # in the checkpoint replay too: it must repeat the forward's ops
                if record:
                    state.add_aux(name, loss, coef)
            elif record:
                state.add_pooled(name, pool, parts, finish, coef)

    def _pool_key(self) -> tuple | None:
        """Which routers' aux statistics pool together (router.aux_pool): None = this router alone."""
        pool = self.cfg.aux_pool
        if pool == "router":
            return None
        if pool == "layer":
            return ("layer", self.layer_index, self.num_experts)
        return ("model", self.num_experts)

    def _balance(
        self, out: RouterOutput, flat_mask: torch.Tensor | None, record: bool = True
    ) -> tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]:
        """The parts of this forward's load-balance loss and the function that forms it; with
        balance_scope=global, f_e counts every micro-batch of the optimizer step so far on every
        data-parallel rank (MoAState.step_counts). ``record`` False (the checkpoint replay in backward):
        reuse the totals the forward stored, without adding this micro-batch again or reducing over
        ranks (a collective in backward could deadlock)."""
        cfg, state, num = self.cfg, self._state, self.num_experts
        probs = out.probs.reshape(-1, num)
        keep = out.keep.reshape(-1, num) if out.keep is not None else torch.ones_like(probs, dtype=torch.bool)
        official = cfg.balance_norm == "official"
        tau = out.threshold.reshape(-1, 1) if official and cfg.selection == "adamole" else None
        weights = out.weights.reshape(-1, num) if cfg.balance_norm == "weights" else None
        counts, tokens = aux_losses.assignment_counts(keep, flat_mask, cfg.balance_norm, weights)
        if cfg.balance_norm != "weights":
            counts, tokens = counts.detach(), tokens.detach()
        if cfg.balance_scope == "global":
            if record:
                counts, tokens = state.accumulate_counts(self, counts, tokens)
            else:
                totals = state.step_counts[id(self)]
                counts, tokens = totals[:-1], totals[-1]
        prob_sum, prob_tokens = aux_losses.probability_sums(probs, flat_mask, tau)
        return (counts, tokens, prob_sum, prob_tokens), aux_losses.pooled_balance

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
