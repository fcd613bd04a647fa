"""Router analysis over generated tokens (method spec F.3): gate statistics, inter-expert std, router cases."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from moa_train.eval.generation import (
    GenerationOutput,
    left_pad,
    length_sorted_batches,
    model_device,
    pad_token_id,
)

log = logging.getLogger(__name__)


def telemetry_enabled(model: torch.nn.Module) -> bool:
    state = getattr(model, "_state", None)  # MoAModel keeps the flag in its per-forward state
    return bool(getattr(state, "collect_stats", True))


def set_telemetry(model: torch.nn.Module, enabled: bool) -> None:
    if hasattr(model, "set_telemetry"):
        model.set_telemetry(enabled)


def processed_sequences(out: GenerationOutput) -> list[list[int]]:
    """The tokens generation fed through the model: the prompt plus every generated token but the last.

    (The last new token -- EOS or the budget's end -- is produced but never processed.)
    """
    return [p + g[:-1] for p, g in zip(out.prompt_ids, out.generated_ids)]


def _layer_gates(captured: Sequence[Any], num_layers: int) -> list[torch.Tensor] | None:
    """Per-layer gate tensors [B, T|1, E] of ONE forward from what ``capture_gates(primary_only=True)``
    collected (the routers ``router_stats()`` reports, one per routed layer); None if the count differs."""
    flat: list[torch.Tensor] = []
    for item in captured:
        flat.extend(item if isinstance(item, list | tuple) else [item])
    return flat if len(flat) == num_layers else None


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the (wrapped) HF model's forward takes ``argument``."""
    forward = getattr(getattr(model, "base_model", model), "forward", None)
    with contextlib.suppress(TypeError, ValueError):
        return argument in inspect.signature(forward).parameters
    return False


def _analysis_forward(
    model: torch.nn.Module, rows: list[list[int]], prompt_lens: list[int], pad_id: int
) -> tuple[list[torch.Tensor] | None, torch.Tensor, int]:
    """Teacher-forced forward over processed tokens; (per-layer gates or None, token mask, n captured)."""
    ids, mask, positions = left_pad(rows, pad_id)
    width = ids.shape[1]
    # instance-level routers pool over the prompt only, as they did at generation time
    prompt_mask = torch.zeros_like(mask)
    for r, (row, n_prompt) in enumerate(zip(rows, prompt_lens)):
        start = width - len(row)
        prompt_mask[r, start : start + n_prompt] = 1
    device = model_device(model)
    extra = (
        {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    )  # gates only: skip [B, T, V] logits
    with model.capture_gates(primary_only=True) as captured:
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            instance_mask=prompt_mask.to(device),
            **extra,
        )
    num_layers = len(model.router_stats()["layers"])
    gates = _layer_gates(captured, num_layers)
    if gates is not None:
        gates = [g.detach().float().cpu().expand(ids.shape[0], width, -1) for g in gates]
    return gates, mask, len(captured)


def router_analysis(
    model: torch.nn.Module,
    tokenizer: Any,
    out: GenerationOutput,
    batch_size: int,
    case_examples: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Router statistics over all processed tokens (prompt + generated) of one dataset.

    Token-level gates depend only on a token's causal prefix, so a teacher-forced forward over the
    processed tokens reproduces the gates of generation (instance routers get the prompt as their
    pooling mask); doing it after generation keeps the timing clean and gives padding-free per-token
    vectors. The core's telemetry (masked to real tokens) gives mean gate / active fraction / active
    experts / threshold per layer; the captured per-token gates give the inter-expert std (population
    std over experts, mean over tokens and layers per example, then mean over examples, spec F.3)
    and the ``router_case`` vectors.
    """
    sequences = processed_sequences(out)
    prompt_lens = [len(p) for p in out.prompt_ids]
    pad_id = pad_token_id(tokenizer)
    set_telemetry(model, True)
    model.reset_router_stats()
    layer_std: torch.Tensor | None = None
    example_std: list[float] = []
    cases: dict[int, dict[str, Any]] = {}
    tokens_total, per_token_ok, seen = 0, True, 0
    try:
        for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
            gates, mask, seen = _analysis_forward(
                model, [sequences[i] for i in batch], [prompt_lens[i] for i in batch], pad_id
            )
            tokens_total += int(mask.sum())
            per_token_ok = per_token_ok and gates is not None
            if not per_token_ok:
                continue
            maskf = mask.float()
            stds = [g.std(-1, unbiased=False) * maskf for g in gates]  # [B, T] per layer; padding 0
            sums = torch.stack([s.sum() for s in stds])
            layer_std = sums if layer_std is None else layer_std + sums
            per_row = torch.stack(stds).sum((0, 2)) / (maskf.sum(-1) * len(gates))  # [B]
            example_std += per_row.tolist()
            for row, i in enumerate(batch):
                if i < case_examples:
                    n_tok = int(mask[row].sum())
                    layer_rows = [g[row, -n_tok:] for g in gates]
                    cases[i] = _router_case(tokenizer, i, sequences[i], prompt_lens[i], layer_rows)
        stats = dict(model.router_stats())
    finally:
        set_telemetry(model, False)
    if not per_token_ok:
        log.warning(
            "per-token gates unavailable (%d router outputs per forward for %d layers): "
            "no inter-expert std or router_case for this model",
            seen,
            len(stats.get("layers", [])),
        )
    stats["inter_expert_std"] = sum(example_std) / len(example_std) if per_token_ok and example_std else None
    stats["inter_expert_std_per_layer"] = (
        (layer_std / max(tokens_total, 1)).tolist() if per_token_ok and layer_std is not None else None
    )
    stats["examples"] = len(sequences)
    stats["processed_tokens"] = tokens_total
    return stats, [cases[i] for i in sorted(cases)]


def _router_case(
    tokenizer: Any, index: int, ids: list[int], prompt_len: int, layer_gates: list[torch.Tensor]
) -> dict[str, Any]:
    """Per-token gate vectors of one example: gates[layer][token][expert], rounded for a compact file."""
    return {
        "index": index,
        "prompt_tokens": prompt_len,
        "tokens": [tokenizer.decode([t]) for t in ids],
        "gates": [[[round(float(v), 5) for v in tok] for tok in g.tolist()] for g in layer_gates],
    }
