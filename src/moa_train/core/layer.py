"""MoALayer: the experts and block router of one decoder layer, and how a gate meets its expert.

The flow inside one decoder layer (hooks are installed by inject.py):
  1. decoder-layer pre-hook -> ``route(h)``: the block router turns the layer input h into weights
     [B, T, S] (S = experts of this layer in slot order, spec A.4) and, when sparse, a keep mask.
  2. each site hook (q/k/v/o/up/gate/down projection, MLP for the PA, attention function for the
     prompt) calls ``delta(slot, x, expert)``, which multiplies that expert's output by its own gate —
     or, sparse, runs the expert only on the tokens that kept it and scatters the result back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moa_train.core.config import LORA_SITES, SLOT_ORDER, MoAConfig
from moa_train.core.experts import FFNExperts, LoRAExperts, ParallelAdapter, PromptExpert
from moa_train.core.ops import padded_rows, zero_padding
from moa_train.core.routers import Router, RouterOutput
from moa_train.core.segments import pool_segments, spread


class PooledAux:
    """An aux loss pooled over routers (router.aux_pool=layer or model): per pool key the summed parts of
    its routers (token counts, probability sums, ...) and the function that turns them into one loss.
    ``value()`` adds the pools' losses to the per-router losses of the same name (``direct``). It is
    evaluated when read, after the forward: outside any activation-checkpointed region, whose backward
    replay must repeat only the per-router ops."""

    def __init__(self, direct: torch.Tensor | None = None) -> None:
        self.direct = direct
        self.groups: dict[tuple, tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]] = {}

    def add(self, key: tuple, parts: tuple[torch.Tensor, ...], finish: Callable[..., torch.Tensor]) -> None:
        previous = self.groups.get(key)
        if previous is not None:
            parts = tuple(a + b for a, b in zip(previous[0], parts))
        self.groups[key] = (parts, finish)

    def value(self) -> torch.Tensor:
        losses = [finish(*parts) for parts, finish in self.groups.values()]
        if self.direct is not None:
            losses.append(self.direct)
        return torch.stack(losses).sum()


def aux_value(total: torch.Tensor | PooledAux) -> torch.Tensor:
    """The loss of one ``MoAState.aux`` entry."""
    return total.value() if isinstance(total, PooledAux) else total


class MoAState:
    """Per-forward facts shared by every layer of one model (set by the model-level pre-hook)."""

    def __init__(self, sparse_impl: str) -> None:
        self.enabled = True
        self.sparse_impl = sparse_impl
        self.token_mask: torch.Tensor | None = None  # [B, T] 1 for real tokens of this forward
        self.instance_mask: torch.Tensor | None = None  # [B, T] tokens an instance router averages over
        self.explicit_instance_mask: torch.Tensor | None = None
        # packed rows: segment ids [B, T] of this forward (1, 2, ... per example, 0 padding) and their
        # segment_index (core/segments.py); None for one example per row
        self.segment_ids: torch.Tensor | None = None
        self.segments: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.is_prefill = True  # False on decoding steps that reuse a KV cache
        self.collect_stats = True
        self.capture: list[torch.Tensor] | None = None
        self.capture_only: set[int] | None = None  # ids of the routers to capture (None: all)
        # name -> (summed loss, or the pools of router.aux_pool=layer|model; coefficient)
        self.aux: dict[str, tuple[torch.Tensor | PooledAux, float]] = {}
        self.task_types: torch.Tensor | None = None  # [B] 0/1 task type of each example (LoRAMoE LBC)
        # Global-batch load balance: per router, expert counts and tokens of the current optimizer step
        # (summed over ranks by step_reduce), reset by begin_step().
        self.step_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def begin_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Start an optimizer step: forget the global-batch counts; ``reduce`` sums a tensor over ranks."""
        self.step_counts = {}
        self.step_reduce = reduce

    def accumulate_counts(
        self, router: nn.Module, counts: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this micro-batch's (counts [E], tokens []) of ``router``, summed over ranks, to the step's
        running totals and return the totals: f_e = totals_e / total tokens so far in this step."""
        packed = torch.cat([counts.detach().float(), tokens.detach().float().reshape(1)])
        if self.step_reduce is not None:
            packed = self.step_reduce(packed)
        previous = self.step_counts.get(id(router))
        if previous is not None:
            packed = packed + previous
        self.step_counts[id(router)] = packed
        return packed[:-1], packed[-1]

    def add_aux(self, name: str, loss: torch.Tensor, coef: float) -> None:
        total = self.aux[name][0] if name in self.aux else None
        if isinstance(total, PooledAux):
            total.direct = loss if total.direct is None else total.direct + loss
        else:
            total = loss if total is None else total + loss
        self.aux[name] = (total, coef)

    def add_pooled(
        self,
        name: str,
        key: tuple,
        parts: tuple[torch.Tensor, ...],
        finish: Callable[..., torch.Tensor],
        coef: float,
    ) -> None:
        """Add one router's parts of a pooled aux loss (see PooledAux) to the pool ``key``."""
        total = self.aux[name][0] if name in self.aux else None
        if not isinstance(total, PooledAux):
            total = PooledAux(total)
        total.add(key, parts, finish)
        self.aux[name] = (total, coef)

    def use_gather(self, x: torch.Tensor) -> bool:
        """Sparse experts: gather the selected rows, or multiply by a zeroed gate (dense masked).

        auto = dense masked on every device. On accelerators it avoids the nonzero() host sync; on CPU it
        was measured faster too (moa-bench, SmolLM2-135M, batch 8 x 128, docs/benchmarks.md): LoRA r8 /
        PA16 experts are skinny, memory-bound GEMMs, so gathering the kept rows and scattering the
        result back moves more memory than the skipped FLOPs save (Sparse MoA: gather ~1.3x the step
        time of dense; Top-2 MoE-LoRA: ~2.5x), even with ~1/3 of (token, expert) pairs dropped.
        ``sparse_impl="gather"`` still runs each expert only on its tokens (spec B.2).
        """
        if self.sparse_impl == "auto":
            return False
        return self.sparse_impl == "gather"


class MoALayer(nn.Module):
    def __init__(
        self,
        cfg: MoAConfig,
        lora_shapes: dict[str, tuple[int, int]],
        hidden_size: int,
        num_heads: int,
        use_prompt: bool,
        use_pa: bool,
        state: MoAState,
        ffn: tuple[int, int, nn.Module] | None = None,
    ) -> None:
        """``ffn``: (hidden, intermediate, the MLP's activation) when the layer gets block-level FFN experts."""
        super().__init__()
        self._state = state
        self.cfg = cfg
        self.lora = nn.ModuleDict(
            {
                site: LoRAExperts(
                    fan_in,
                    fan_out,
                    cfg.rank_for(site),
                    cfg.lora_alpha,
                    cfg.lora_dropout,
                    cfg.lora_experts,
                    cfg.lora_shared_a,
                    cfg.site_router,
                    state,
                    cfg.lora_mixer,
                )
                for site, (fan_in, fan_out) in lora_shapes.items()
            }
        )
        self.prompt = (
            PromptExpert(
                hidden_size,
                num_heads,
                cfg.prompt_len,
                cfg.prompt_experts,
                cfg.site_router,
                state,
                cfg.prompt_moe_form,
            )
            if use_prompt
            else None
        )
        self.pa = (
            ParallelAdapter(
                hidden_size,
                cfg.pa_size,
                cfg.pa_activation,
                cfg.pa_init_gain,
                cfg.pa_experts,
                cfg.pa_shared_down,
                cfg.site_router,
                state,
            )
            if use_pa
            else None
        )
        self.ffn = (
            FFNExperts(*ffn[:2], cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.ffn_experts,
                       cfg.site_router, ffn[2], state)
            if ffn is not None
            else None
        )  # fmt: skip
        present = set(lora_shapes) | ({"prompt"} if use_prompt else set()) | ({"pa"} if use_pa else set())
        self.slots = [s for s in SLOT_ORDER if s in present]
        self.slot_index = {s: i for i, s in enumerate(self.slots)}
        self.router_outputs = self.slots
        self.router: Router | None = None
        if cfg.router.kind != "none":
            slot_to_output = None
            if cfg.router.groups == "type":  # UniPEFT: one gate per expert type
                types = list(dict.fromkeys("lora" if s in LORA_SITES else s for s in self.slots))
                slot_to_output = [types.index("lora" if s in LORA_SITES else s) for s in self.slots]
                self.router_outputs = types
            self.router = Router(hidden_size, len(self.router_outputs), cfg.router, state)
            self.register_buffer(
                "slot_to_output",
                None if slot_to_output is None else torch.tensor(slot_to_output),
                persistent=False,
            )
        self.weights: torch.Tensor | None = None  # [B, T or 1, S] of the current forward
        self._columns: tuple | None = None  # (weights, its S [B, T or 1, 1] column views)
        self.keep: torch.Tensor | None = None
        self._instance_cache: RouterOutput | None = None
        self._attn_input: torch.Tensor | None = None  # router input of prompt-MoE
        # set by inject.py (plain attributes, not submodules): the norm whose output the attention reads
        # (None: the residual stream itself, OLMo 2) and the family view of the attention (prompt expert)
        self.__dict__.update(_attn_norm=None, _attn_view=None)

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        """The attention's input for the layer input h (what a ``normed`` router and prompt-MoE read)."""
        return h if self._attn_norm is None else self._attn_norm(h)

    # -- step 1: the block router ---------------------------------------------------------------
    def route(self, decoder_layer: nn.Module, h: torch.Tensor) -> None:
        cfg, state = self.cfg.router, self._state
        if self.prompt is not None and self.prompt.router is not None:
            self.__dict__["_attn_input"] = self._normed(h)
        if self.router is None:
            self.__dict__.update(weights=None, keep=None, _columns=None)
            return
        x = h if cfg.input == "residual" else self._normed(h)
        mask = state.token_mask
        if cfg.granularity == "instance":
            out = self._route_instance(x, mask)
        else:
            out = self.router(x, mask)
        weights, keep = out.weights, out.keep
        if self.slot_to_output is not None:
            weights = weights[..., self.slot_to_output]
            keep = None if keep is None else keep[..., self.slot_to_output]
        # Per-forward state goes straight into __dict__: nn.Module.__setattr__ costs ~10 us a call, which
        # adds up per layer while decoding (perf). These names are plain attributes (set in __init__).
        self.__dict__.update(weights=weights, keep=keep, _columns=None)

    def _route_instance(self, x: torch.Tensor, mask: torch.Tensor | None) -> RouterOutput:
        """One gate vector per sequence: masked mean over the prompt at prefill, reused while decoding."""
        state = self._state
        counts = (
            mask.sum(1, keepdim=True) if mask is not None else x.new_full((x.shape[0], 1), float(x.shape[1]))
        )
        if state.segments is not None and (state.is_prefill or self._instance_cache is None):
            return self._route_segments(x, state.instance_mask if state.instance_mask is not None else mask)
        if state.is_prefill or self._instance_cache is None:
            pool = state.instance_mask if state.instance_mask is not None else mask
            if pool is None:
                pooled = x.mean(1, keepdim=True)
            else:
                pool = pool.to(x.dtype).unsqueeze(-1)
                pooled = (x * pool).sum(1, keepdim=True) / pool.sum(1, keepdim=True).clamp_min(1.0)
            self.__dict__["_instance_cache"] = self.router(pooled, counts)
            return self._instance_cache
        self.router.record(self._instance_cache, counts)
        return self._instance_cache

    def _route_segments(self, x: torch.Tensor, pool: torch.Tensor | None) -> RouterOutput:
        """Packed rows: one gate vector per example (pooled over that example's tokens only), given to
        that example's tokens; the router sees [examples, 1, H] as for unpacked rows, so telemetry and
        aux losses weigh each example by its real tokens exactly as there."""
        segments = self._state.segments
        pooled, counts = pool_segments(x, pool, segments)
        out = self.router(pooled, counts)
        index, real, _ = segments
        weights = spread(out.weights, index, real)
        keep = None if out.keep is None else spread(out.keep, index, real)
        result = RouterOutput(weights, keep, None, None, gates=weights)
        self.__dict__["_instance_cache"] = result
        return result

    # -- step 2: gate x expert at each site -------------------------------------------------------
    def gate_column(self, i: int) -> torch.Tensor:
        """Slot i's gate as a [B, T or 1, 1] column (one unbind per forward for all slots: perf, fewer ops)."""
        weights = self.weights
        if self._columns is None or self._columns[0] is not weights:
            self.__dict__["_columns"] = (weights, weights.unsqueeze(-1).unbind(-2))
        return self._columns[1][i]

    def delta(self, slot: str, x: torch.Tensor, expert: nn.Module) -> torch.Tensor:
        """The gated additive contribution of ``expert`` at ``slot`` for site input x [B, T, in].

        Experts with a ``delta(x, gate)`` method (LoRA, PA) apply the gate column on their low-rank
        hidden (cheaper than on the [B, T, out] output; see LoRAExperts.delta); other modules are gated here.
        """
        if self.weights is None:
            return expert(x)
        i = self.slot_index[slot]
        gated = getattr(expert, "delta", None)
        if self.keep is not None and self._state.use_gather(x):
            keep = self.keep[..., i].expand(x.shape[:-1])
            rows, n = padded_rows(keep)
            flat = x.reshape(-1, x.shape[-1])
            gate = zero_padding(self.weights[..., i].expand(x.shape[:-1]).reshape(-1)[rows, None], n)
            if gated is not None:
                selected = gated(flat[rows], gate)
            else:
                selected = expert(flat[rows])
                selected = selected * gate.to(selected.dtype)
            out = selected.new_zeros(flat.shape[0], selected.shape[-1]).index_add_(0, rows, selected)
            return out.reshape(*x.shape[:-1], -1)
        gate = self.gate_column(i)
        if gated is not None:
            return gated(x, gate)
        out = expert(x)
        return out * gate.to(out.dtype)

    def prompt_delta(self, attn: nn.Module, query: torch.Tensor) -> torch.Tensor:
        """Gated prompt-attention output [B, T, heads, head_dim] (always dense: spec B.2).

        The gate is folded into the prompt's attention probabilities (see PromptExpert.forward).
        """
        gate = None if self.weights is None else self.gate_column(self.slot_index["prompt"])
        return self.prompt(self._attn_view, query, self._attn_input, gate)
