"""Generation-based evaluation (LLM-Adapters protocol, method spec E) shared by the quickstart and moa-eval.

The one implementation is :func:`evaluate_records`: Alpaca prompts -> batched generation (KV cache,
left padding, examples sorted by length) -> answer extraction (:mod:`moa_train.extract`) -> per-dataset
accuracy, throughput and (for MoA models) router statistics. :func:`run_from_config` is the body of
``moa-eval``: it resolves the checkpoint and the base model, loads the preset's data, calls
:func:`evaluate_records` (or the lm-eval back-end) and writes ``results.json``, ``predictions.jsonl``,
``router_stats.json`` and heat-maps.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moa_train.errors import MoATrainError
from moa_train.extract import AnswerRule, extract, extract_answer, is_correct, rule_for

__all__ = [
    "DecodingConfig",
    "GenerationOutput",
    "evaluate_records",
    "extract_answer",
    "generate",
    "load_eval_records",
    "load_llm_adapters_file",
    "markdown_table",
    "resolve_checkpoint",
    "run_from_config",
]

log = logging.getLogger(__name__)

RESULTS_SCHEMA_VERSION = 1
# Max new tokens per task family (LLM-Adapters: 256 math, 32 commonsense); moa-eval presets override.
DEFAULT_MAX_NEW_TOKENS = {"math": 256, "commonsense": 32, "arithmetic": 16, "default": 64}
DEFAULT_MAX_NEW_TOKENS_CAP = 256
_ARITHMETIC_NAME = re.compile(r"arith|digit_(addition|subtraction|multiplication|division)")
REQUIRED_FIELDS = ("instruction", "answer")


# ----------------------------------------------------------------------------------------------------
# Decoding presets
# ----------------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The directory holding the packaged Hydra configs (``moa_train.configs``, else the source tree)."""
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        import importlib.resources

        found = Path(str(importlib.resources.files("moa_train.configs")))
        if (found / "decoding").is_dir():
            return found
    return Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class DecodingConfig:
    """One decoding preset (configs/decoding/*.yaml). ``top_k=0`` keeps HF from adding its top-50 filter."""

    name: str = "greedy"
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_any(cls, value: str | Mapping[str, Any] | DecodingConfig | None) -> DecodingConfig:
        """Accept a preset name, a (Dict)Config node or a DecodingConfig."""
        if value is None:
            value = "greedy"
        if isinstance(value, DecodingConfig):
            return value
        if isinstance(value, str):
            path = config_dir() / "decoding" / f"{value}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise MoATrainError(f"decoding preset {value!r} not found; known presets: {', '.join(known)}")
            value = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        known_fields = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known_fields)
        if unknown:
            raise MoATrainError(
                f"unknown decoding field(s) {', '.join(unknown)}; known: {', '.join(sorted(known_fields))}"
            )
        config = cls(**{k: v for k, v in value.items() if v is not None})
        if config.num_beams < 1:
            raise MoATrainError(f"decoding.num_beams must be >= 1, got {config.num_beams}")
        if config.do_sample and not (config.temperature and config.temperature > 0):
            raise MoATrainError("decoding.do_sample=true needs decoding.temperature > 0")
        return config

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments for ``model.generate`` (sampling knobs only when sampling, to avoid HF warnings).

        Knobs that would change the protocol are set to neutral values explicitly: HF fills unset
        ones from the model's own generation_config (e.g. a shipped repetition_penalty).
        """
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "no_repeat_ngram_size": 0,
            "length_penalty": 1.0,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k)
        return kwargs


# ----------------------------------------------------------------------------------------------------
# Batched generation
# ----------------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    """Token counts and wall-clock split into prefill (prompt forward) and decode (later steps)."""

    examples: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0

    def add(self, other: Throughput) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float | int]:
        def rate(tokens: int, seconds: float) -> float:
            return round(tokens / seconds, 3) if seconds > 0 else 0.0

        n = max(self.examples, 1)
        return {
            **asdict(self),
            "prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_seconds),
            "decode_tokens_per_s": rate(self.decode_tokens, self.decode_seconds),
            "seconds_per_example": round(self.total_seconds / n, 6),
            "decode_seconds_per_example": round(self.decode_seconds / n, 6),
        }


@dataclass
class GenerationOutput:
    """Generations in the order of the prompts given, plus the exact token ids that were processed."""

    texts: list[str]
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]  # cut after the first EOS (EOS included when produced)
    throughput: Throughput = field(default_factory=Throughput)


class _PrefillTimer:
    """Stopping criterion that never stops: records when the first new token exists (end of prefill)."""

    def __init__(self) -> None:
        self.first_step_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """Pad id for left padding; models without one (Llama-style) reuse EOS, which the mask hides."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise MoATrainError("the tokenizer has neither a pad nor an EOS token; cannot batch generation")
    return int(tokenizer.eos_token_id)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids that end a generation: the tokenizer's plus those of the model's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_config = getattr(getattr(model, "base_model", model), "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    for value in extra if isinstance(extra, list | tuple) else [extra]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def encode_prompt(tokenizer: Any, record: Mapping[str, Any]) -> list[int]:
    """Token ids of a record's Alpaca prompt, tokenised exactly as training tokenises its prompt part."""
    from moa_train.data import encode_prompt_ids

    return encode_prompt_ids(tokenizer, str(record["instruction"]), str(record.get("input") or ""))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (input_ids, attention_mask, position_ids); positions start at 0 per row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def _cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[list[int]],
    decoding: DecodingConfig,
    max_new_tokens: int,
    eos_ids: list[int],
) -> tuple[list[list[int]], Throughput]:
    pad_id = pad_token_id(tokenizer)
    ids, mask, _ = left_pad(rows, pad_id)
    device = model_device(model)
    timer = _PrefillTimer()
    start = time.perf_counter()
    # Position ids come from the attention mask inside HF generate (cumsum - 1), so left-padded rows
    # see the same positions as when generated alone; batched greedy == unbatched greedy.
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        use_cache=True,
        stopping_criteria=[timer],
        **decoding.generation_kwargs(),
    )
    end = time.perf_counter()
    new = out[:, ids.shape[1] :].tolist()
    generated = [_cut_at_eos(row, eos_ids) for row in new]
    first = timer.first_step_at or end
    stats = Throughput(
        examples=len(rows),
        prefill_tokens=int(mask.sum()),
        generated_tokens=sum(len(g) for g in generated),
        # the first new token of every row comes out of the prefill forward
        decode_tokens=sum(max(len(g) - 1, 0) for g in generated),
        prefill_seconds=first - start,
        decode_seconds=end - first,
        total_seconds=end - start,
    )
    return generated, stats


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (memory peaks show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    decoding: DecodingConfig,
    batch_size: int,
    max_new_tokens: int,
) -> GenerationOutput:
    """Generate an answer for every record (Alpaca prompt), batched by length; results in input order."""
    if batch_size < 1:
        raise MoATrainError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [encode_prompt(tokenizer, r) for r in records]
    eos_ids = eos_token_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in prompts]
    total = Throughput()
    # a seeded preset is reproducible for a given batch size and order, without touching the caller's RNG
    with torch.random.fork_rng(enabled=decoding.seed is not None):
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            outs, stats = _generate_batch(
                model, tokenizer, [prompts[i] for i in batch], decoding, max_new_tokens, eos_ids
            )
            for i, out in zip(batch, outs):
                generated[i] = out
            total.add(stats)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return GenerationOutput(texts=texts, prompt_ids=prompts, generated_ids=generated, throughput=total)


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


def task_family(rule: AnswerRule, dataset: str) -> str:
    """Family used for the max-new-tokens budget: commonsense labels, short arithmetic, or math."""
    if rule.kind == "label":
        return "commonsense"
    if rule.kind == "numeric" and _ARITHMETIC_NAME.search(dataset.lower()):
        return "arithmetic"
    return "math"


def resolve_max_new_tokens(
    dataset: str,
    rule: AnswerRule,
    records: Sequence[Mapping[str, Any]],
    override: int | Mapping[str, int] | None,
    family_budget: Mapping[str, int] | None = None,
    cap: int | None = DEFAULT_MAX_NEW_TOKENS_CAP,
) -> int:
    """Budget for one dataset: explicit override > the records' ``eval_max_new_tokens`` > family default.

    Always capped, so that a few runaway generations cannot multiply the evaluation time.
    """
    value: int | None = None
    if isinstance(override, Mapping):
        value = override.get(dataset)
    elif override is not None:
        value = int(override)
    if value is None:
        from_records = {int(r["eval_max_new_tokens"]) for r in records if r.get("eval_max_new_tokens")}
        value = max(from_records) if from_records else None
    if value is None:
        budget = {**DEFAULT_MAX_NEW_TOKENS, **(family_budget or {})}
        value = int(budget.get(task_family(rule, dataset), budget["default"]))
    if value < 1:
        raise MoATrainError(f"max new tokens for {dataset} must be >= 1, got {value}")
    return min(value, int(cap)) if cap else value


def group_by_dataset(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Indices of the records per ``dataset`` field, in first-seen order (missing name: 'default')."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(str(record.get("dataset") or "default"), []).append(i)
    return groups


def dataset_rule(
    dataset: str, records: Sequence[Mapping[str, Any]], letter_rule: str = "first"
) -> AnswerRule:
    """One rule per dataset; unknown label sets use all their gold answers as label words."""
    types = {r.get("answer_type") for r in records if r.get("answer_type")}
    if len(types) > 1:
        raise MoATrainError(f"dataset {dataset} mixes answer types {sorted(types)}")
    labels = [w for r in records for w in (r.get("labels") or [])]
    answers = labels or [str(r["answer"]) for r in records]
    return rule_for(dataset, types.pop() if types else None, answers, letter_rule=letter_rule)


def validate_records(records: Sequence[Mapping[str, Any]], source: str = "records") -> None:
    """Every record needs an instruction and a gold answer (a one-line error names the first offender)."""
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise MoATrainError(f"{source}: item {i} is a {type(record).__name__}, expected a JSON object")
        missing = [f for f in REQUIRED_FIELDS if record.get(f) is None]
        if missing:
            raise MoATrainError(f"{source}: item {i} has no {' / '.join(repr(m) for m in missing)} field")


def _prediction(record: Mapping[str, Any], index: int, text: str, n_tokens: int, rule: AnswerRule) -> dict:
    predicted = extract(rule, text)
    gold = str(record["answer"]).strip()
    return {
        "dataset": str(record.get("dataset") or "default"),
        "index": index,
        "instruction": record["instruction"],
        "input": record.get("input") or "",
        "generation": text,
        "extracted": predicted,
        "gold": gold,
        "correct": is_correct(rule, predicted, gold),
        "generated_tokens": n_tokens,
    }


def _dataset_row(rows: list[dict], rule: AnswerRule, budget: int, throughput: Throughput) -> dict[str, Any]:
    correct = sum(r["correct"] for r in rows)
    return {
        "accuracy": correct / len(rows),
        "n": len(rows),
        "correct": correct,
        "answer_type": rule.kind,
        "max_new_tokens": budget,
        "throughput": throughput.as_dict(),
    }


def evaluate_records(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    decoding: str | Mapping[str, Any] | DecodingConfig | None = "greedy",
    batch_size: int = 8,
    max_new_tokens: int | Mapping[str, int] | None = None,
    collect_router: bool = False,
    router_case: int = 0,
    family_max_new_tokens: Mapping[str, int] | None = None,
    max_new_tokens_cap: int | None = DEFAULT_MAX_NEW_TOKENS_CAP,
    letter_rule: str = "first",
    router_stats: bool | None = None,
) -> dict[str, Any]:
    """Generate, extract and score ``records`` (LLM-Adapters dicts with ``dataset``); one call per eval.

    Works with a plain HF causal LM or a MoAModel. Returns ``accuracy`` (over all records),
    ``mean_accuracy`` (unweighted over datasets), ``n``, ``correct``, ``datasets`` (per-dataset
    accuracy / n / budget / throughput), ``throughput``, ``predictions`` and, when ``collect_router``
    and the model has router statistics, ``router`` (per dataset) and ``router_cases``.
    ``router_stats`` is the older spelling of ``collect_router`` (docs/CONTRACTS.md).
    """
    if router_stats is not None:
        collect_router = bool(router_stats)
    validate_records(records)
    if not records:
        raise MoATrainError("nothing to evaluate: the record list is empty")
    decoding = DecodingConfig.from_any(decoding)
    router_on = (collect_router or router_case > 0) and hasattr(model, "router_stats")
    was_training, telemetry_was = model.training, _telemetry_enabled(model)
    model.eval()
    # per-forward router statistics only slow generation down; the analysis pass collects its own
    _set_telemetry(model, False)
    predictions: list[dict] = [{} for _ in records]
    per_dataset: dict[str, dict[str, Any]] = {}
    router: dict[str, dict[str, Any]] = {}
    cases: list[dict[str, Any]] = []
    total = Throughput()
    try:
        with torch.no_grad():
            for dataset, indices in group_by_dataset(records).items():
                subset = [records[i] for i in indices]
                rule = dataset_rule(dataset, subset, letter_rule)
                budget = resolve_max_new_tokens(
                    dataset, rule, subset, max_new_tokens, family_max_new_tokens, max_new_tokens_cap
                )
                out = generate(
                    model, tokenizer, subset, decoding=decoding, batch_size=batch_size, max_new_tokens=budget
                )
                rows = [
                    _prediction(record, local, text, len(ids), rule)
                    for local, (record, text, ids) in enumerate(zip(subset, out.texts, out.generated_ids))
                ]
                for i, row in zip(indices, rows):
                    predictions[i] = row
                per_dataset[dataset] = _dataset_row(rows, rule, budget, out.throughput)
                total.add(out.throughput)
                if router_on:
                    stats, new_cases = router_analysis(
                        model, tokenizer, out, batch_size, max(router_case - len(cases), 0)
                    )
                    router[dataset] = stats
                    cases.extend({"dataset": dataset, **c} for c in new_cases)
    finally:
        model.train(was_training)
        _set_telemetry(model, telemetry_was)
    n = len(records)
    correct = sum(p["correct"] for p in predictions)
    result: dict[str, Any] = {
        "accuracy": correct / n,
        "mean_accuracy": sum(d["accuracy"] for d in per_dataset.values()) / len(per_dataset),
        "n": n,
        "correct": correct,
        "decoding": asdict(decoding),
        "batch_size": batch_size,
        "datasets": per_dataset,
        "throughput": total.as_dict(),
        "predictions": predictions,
    }
    if router_on:
        result["router"] = router
        result["router_cases"] = cases
    return result


# ----------------------------------------------------------------------------------------------------
# Router analysis (method spec F.3)
# ----------------------------------------------------------------------------------------------------


def _telemetry_enabled(model: torch.nn.Module) -> bool:
    state = getattr(model, "_state", None)  # MoAModel keeps the flag in its per-forward state
    return bool(getattr(state, "collect_stats", True))


def _set_telemetry(model: torch.nn.Module, enabled: bool) -> None:
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
    _set_telemetry(model, True)
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
        _set_telemetry(model, False)
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


# ----------------------------------------------------------------------------------------------------
# Data for moa-eval presets
# ----------------------------------------------------------------------------------------------------


def load_llm_adapters_file(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    limit: int | None = None,
    answer_type: str | None = None,
) -> list[dict[str, Any]]:
    """The first ``limit`` records of one LLM-Adapters test file (JSON list or JSONL), validated.

    The dataset is named after the folder for the ``<Dataset>/test.json`` layout, else after the file.
    Reading and validation are the data module's (one-line errors naming the file, record and field).
    """
    from moa_train.data import load_records

    return load_records(path, dataset=dataset, split="test", answer_type=answer_type, limit=limit)


def _preset_files(eval_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """(path, name, answer_type) entries of a file-based preset (commonsense8 / math6 / custom)."""
    entries: list[dict[str, Any]] = []
    data_dir = eval_cfg.get("data_dir")
    for name in eval_cfg.get("datasets") or []:
        if not data_dir:
            raise MoATrainError(
                f"eval={eval_cfg.get('name')} needs eval.data_dir=<folder with <Dataset>/test.json> "
                "(the LLM-Adapters dataset/ layout)"
            )
        entries.append(
            {"path": Path(str(data_dir)).expanduser() / str(name) / "test.json", "name": str(name)}
        )
    for item in eval_cfg.get("files") or []:
        if isinstance(item, str):
            entries.append({"path": Path(item).expanduser(), "name": None})
        else:
            item = dict(item)
            if "path" not in item:
                raise MoATrainError(f"eval.files entry {item} has no 'path'")
            entries.append(
                {
                    "path": Path(str(item["path"])).expanduser(),
                    "name": item.get("name"),
                    "type": item.get("answer_type"),
                }
            )
    return entries


def load_eval_records(eval_cfg: Mapping[str, Any], run_cfg: Any = None) -> list[dict[str, Any]]:
    """Records of a moa-eval preset, each source cut to ``limit`` items.

    Sources: LLM-Adapters files (``datasets`` under ``data_dir``, and ``files``) and data-group nodes
    (``data``: a list or a name -> node mapping, read with the data module's ``load_splits``, split
    ``split``). ``data: run`` (the ``heldout`` preset) is the training run's own data node, with
    ``split``/``limit`` ``auto`` = that run's ``final_eval`` split and record count, i.e. exactly the
    records its final evaluation scored.
    """
    sources = _data_sources(eval_cfg, run_cfg)  # validates split/limit before any file is read
    limit = eval_cfg.get("limit")
    records: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in _preset_files(eval_cfg):
        if not entry["path"].is_file() and eval_cfg.get("skip_missing"):
            missing.append(str(entry["path"]))
            continue
        records += load_llm_adapters_file(
            entry["path"], entry["name"], limit=limit, answer_type=entry.get("type")
        )
    if missing:
        log.warning("skipped %d missing evaluation file(s): %s", len(missing), ", ".join(missing))
    for data_cfg, split, n in sources:
        records += _data_module_records(data_cfg, split, n)
    if not records:
        raise MoATrainError(
            f"eval={eval_cfg.get('name')}: no evaluation data (set eval.files, eval.datasets or eval.data)"
        )
    return records


def _data_sources(eval_cfg: Mapping[str, Any], run_cfg: Any) -> list[tuple[Any, str, int | None]]:
    """(data node, split, limit) for every data-group source of a preset."""
    data = eval_cfg.get("data")
    split, limit = eval_cfg.get("split") or "test", eval_cfg.get("limit")
    if data == "run":
        final = OmegaConf.select(run_cfg, "final_eval", default=None) if run_cfg is not None else None
        if run_cfg is None or OmegaConf.select(run_cfg, "data", default=None) is None:
            raise MoATrainError(
                f"eval={eval_cfg.get('name')} evaluates a training run's held-out split: pass checkpoint=<run dir> "
                "of a moa-train run (its config.yaml names the data), or set eval.data to a data node"
            )
        if split == "auto":
            split = (final or {}).get("split") or "test"
        if limit == "auto":
            limit = (final or {}).get("max_records")
        data = [run_cfg.data]
    elif isinstance(data, Mapping):  # one data node, or name -> node
        data = list(data.values()) if all(isinstance(v, Mapping) for v in data.values()) else [data]
    for value, name in ((split, "split"), (limit, "limit")):
        if value == "auto":
            raise MoATrainError(f"eval.{name}=auto only works with eval.data=run")
    return [(node, str(split), limit) for node in data or []]


def _data_module_records(data_cfg: Any, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Records of one split of a data-group node (e.g. the embedded BIG-bench tasks) via ``load_splits``."""
    from moa_train.data import load_splits

    splits = load_splits(data_cfg)
    if split not in splits or not splits[split]:
        raise MoATrainError(f"data {data_cfg.get('name')} has no {split!r} split (has {', '.join(splits)})")
    rows = list(splits[split])
    rows = rows[: int(limit)] if limit else rows
    validate_records(rows, source=f"data {data_cfg.get('name')} ({split})")
    return rows


# ----------------------------------------------------------------------------------------------------
# Checkpoints and models
# ----------------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"


def _step_number(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint dir (holds adapter_config.json), or a run dir -> its ``final/`` or newest ``checkpoints/step-N/``."""
    root = Path(path).expanduser()
    if not root.exists():
        raise MoATrainError(f"checkpoint not found: {root}")
    if (root / ADAPTER_CONFIG).is_file():
        return root
    if (root / "final" / ADAPTER_CONFIG).is_file():
        return root / "final"
    steps = [d for d in (root / "checkpoints").glob("step-*") if (d / ADAPTER_CONFIG).is_file()]
    if steps:
        return max(steps, key=_step_number)
    raise MoATrainError(
        f"{root} is not a checkpoint: no {ADAPTER_CONFIG} in it, in final/ or in checkpoints/step-N/"
    )


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run (HydraConfig when running, else a composed ``hydra`` node)."""
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    node = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    return list(node) if node is not None else []


def base_model_node(cfg: DictConfig, adapter_config: Mapping[str, Any] | None) -> Any:
    """The ``model`` node to load: the checkpoint's (adapter_config.json["model"]) unless ``model=`` was given.

    Field overrides such as ``model.dtype=bfloat16`` apply on top of the checkpoint's node.
    """
    overrides = _task_overrides(cfg)
    chosen = any(re.match(r"^[+~]*model=", o) for o in overrides)
    saved = (adapter_config or {}).get("model")
    if chosen or not saved:
        if adapter_config is not None and not saved and not chosen:
            log.warning(
                "the checkpoint does not record its base model; using model=%s", cfg.model.get("name")
            )
        return cfg.model
    node = OmegaConf.create(saved)
    fields_set = [o.split("model.", 1)[1] for o in overrides if re.match(r"^[+~]*model\.", o)]
    return OmegaConf.merge(node, OmegaConf.from_dotlist(fields_set)) if fields_set else node


def load_model_for_eval(
    cfg: DictConfig, ckpt_dir: Path | None, precision: str = "fp32"
) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, model node): the base model alone, or with the checkpoint's adapters.

    With bf16/fp16 the frozen base is cast to that dtype before the adapters (fp32) are attached,
    as moa-train does ("frozen base in the compute dtype"): the residual stream then has the same
    dtype as during training and its final evaluation, not just the autocast matmuls.
    """
    from moa_train.base_models import load_base_model
    from moa_train.model import MoAModel

    adapter_config = MoAModel.read_config(ckpt_dir) if ckpt_dir else None
    node = base_model_node(cfg, adapter_config)
    base, tokenizer = load_base_model(node)
    if PRECISIONS[precision] is not None:
        base.to(dtype=PRECISIONS[precision])
    if ckpt_dir is None:
        return base, tokenizer, node
    try:
        model = MoAModel.from_pretrained(base, ckpt_dir)
    except MoATrainError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoATrainError(
            f"checkpoint {ckpt_dir} does not fit base model {node.get('name')}: {first}"
        ) from None
    return model, tokenizer, node


# ----------------------------------------------------------------------------------------------------
# Output files, table, W&B
# ----------------------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (a crash never leaves a truncated results file); NaN/inf become null."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_predictions(path: Path, predictions: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in predictions:
            fh.write(json.dumps(_json_safe(dict(row)), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def markdown_table(results: Mapping[str, Any]) -> str:
    """Per-dataset accuracy (%) plus the unweighted mean, as a GitHub markdown table."""
    lines = ["| dataset | n | accuracy (%) | s / example |", "|---|---:|---:|---:|"]
    for name, row in results["datasets"].items():
        spe = (row.get("throughput") or {}).get("seconds_per_example")
        lines.append(
            f"| {name} | {row['n']} | {100 * row['accuracy']:.2f} | {'' if spe is None else f'{spe:.3f}'} |"
        )
    if len(results["datasets"]) > 1:
        lines.append(f"| **mean** | {results['n']} | **{100 * results['mean_accuracy']:.2f}** | |")
    return "\n".join(lines)


def save_router_outputs(
    out_dir: Path, router: Mapping[str, Mapping[str, Any]], cases: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """router_stats.json, one layer x expert heat-map of the mean gate per dataset, router_cases.json."""
    from moa_train.plots import save_heatmap

    _write_json(out_dir / "router_stats.json", router)
    heatmaps = {}
    for dataset, stats in router.items():
        if not stats.get("layers"):
            continue
        path = out_dir / f"router_heatmap_{_safe_name(dataset)}.png"
        save_heatmap(
            stats["mean_gate"], stats["layers"], stats["experts"], path, title=f"mean gate - {dataset}"
        )
        heatmaps[dataset] = path.name
    files: dict[str, Any] = {"router_stats": "router_stats.json", "heatmaps": heatmaps}
    if cases:
        experts = next(iter(router.values())).get("experts", [])
        _write_json(out_dir / "router_cases.json", {"experts": experts, "cases": list(cases)})
        files["router_cases"] = "router_cases.json"
    return files


def log_to_wandb(
    results: Mapping[str, Any], out_dir: Path, logger_cfg: Mapping[str, Any] | None, run_id: str | None
) -> str | None:
    """Log the results table and heat-maps to W&B (the training run when its id is known, else a new run).

    Never raises: evaluation results on disk matter more than telemetry, and a machine without
    network (or without wandb credentials) must still finish the evaluation.
    """
    if not logger_cfg or not logger_cfg.get("wandb"):
        return None
    try:
        import wandb

        mode = logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline"
        wanted = logger_cfg.get("run_id")
        resume_id = run_id if wanted in (None, "auto") else str(wanted)
        run = wandb.init(
            project=logger_cfg.get("project") or "moa_train",
            entity=logger_cfg.get("entity"),
            id=resume_id,
            resume="allow" if resume_id else None,
            job_type="eval",
            mode=mode,
            dir=str(logger_cfg.get("dir") or out_dir),
            settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout") or 60)),
        )
        prefix = f"eval/{results.get('eval', 'eval')}"
        table = wandb.Table(columns=["dataset", "n", "accuracy"])
        for name, row in results["datasets"].items():
            table.add_data(name, row["n"], row["accuracy"])
        payload: dict[str, Any] = {
            f"{prefix}/table": table,
            f"{prefix}/mean_accuracy": results["mean_accuracy"],
        }
        payload.update(
            {f"{prefix}/{name}/accuracy": row["accuracy"] for name, row in results["datasets"].items()}
        )
        for dataset, png in ((results.get("files") or {}).get("heatmaps") or {}).items():
            payload[f"{prefix}/router_heatmap/{dataset}"] = wandb.Image(str(out_dir / png))
        run.log(payload)
        run.summary[f"{prefix}/mean_accuracy"] = results["mean_accuracy"]
        run_ref = run.id
        run.finish()
        return run_ref
    except Exception as exc:  # noqa: BLE001 -- telemetry must never fail an evaluation
        log.warning("W&B logging skipped: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


# ----------------------------------------------------------------------------------------------------
# moa-eval
# ----------------------------------------------------------------------------------------------------


def resolve_output_dir(cfg: DictConfig, ckpt_dir: Path | None) -> Path:
    """output_dir if given; else <checkpoint>/eval/<preset>/; else outputs/moa-eval/<preset>_<time>/."""
    preset = _safe_name(str(cfg.eval.get("name") or "eval"))
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir)).expanduser()
    if ckpt_dir is not None:
        return ckpt_dir / "eval" / preset
    return Path("outputs") / "moa-eval" / f"{preset}_{_dt.datetime.now():%Y-%m-%d_%H-%M-%S}"


def find_run_config(ckpt_dir: Path | None) -> DictConfig | None:
    """The moa-train run config (``<run dir>/config.yaml``) of a ``final/`` or ``checkpoints/step-N/`` dir."""
    if ckpt_dir is None:
        return None
    for parent in (ckpt_dir.parent, ckpt_dir.parent.parent):
        path = parent / "config.yaml"
        if path.is_file():
            with contextlib.suppress(Exception):  # an unrelated or damaged file only loses the defaults
                loaded = OmegaConf.load(path)
                if isinstance(loaded, DictConfig) and "trainer" in loaded:
                    return loaded
    return None


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunSettings:
    """Evaluation settings after resolving ``auto`` (and the ``heldout`` preset) against the training run."""

    batch_size: int
    precision: str
    decoding: Any = "greedy"
    max_new_tokens: Any = None


def resolve_run_settings(
    cfg: DictConfig, run_cfg: DictConfig | None, recorded_precision: str | None = None
) -> RunSettings:
    """``auto`` = what the training run's final evaluation used (so a checkpoint scores exactly as the
    quickstart printed: same batches, same base dtype and autocast), else batch 16 in fp32.

    ``recorded_precision`` (adapter_config.json ``precision``, when the trainer records it) wins over
    the run config, so a checkpoint copied away from its run dir keeps its precision. With the
    ``heldout`` preset (``eval.data=run``) the run's ``final_eval`` decoding and max-new-tokens are
    used too, unless given on the command line.
    """
    final = OmegaConf.select(run_cfg, "final_eval", default=None) if run_cfg is not None else None
    batch = cfg.get("batch_size", "auto")
    if batch in (None, "auto"):
        batch = (final or {}).get("batch_size") or 16
    precision = str(cfg.get("precision") or "auto")
    if precision == "auto" and recorded_precision:
        precision = str(recorded_precision)
    if precision == "auto":
        precision = str(
            OmegaConf.select(run_cfg, "trainer.precision", default="fp32") if run_cfg is not None else "fp32"
        )
    if precision not in PRECISIONS:
        raise MoATrainError(f"precision={precision!r} is not known; choose auto, fp32, bf16 or fp16")
    if int(batch) < 1:
        raise MoATrainError(f"batch_size must be >= 1 (or auto), got {batch}")
    decoding, max_new = cfg.get("decoding"), cfg.get("max_new_tokens")
    if OmegaConf.select(cfg, "eval.data", default=None) == "run" and final is not None:
        given = _task_overrides(cfg)
        if final.get("decoding") and not any(re.match(r"^[+~]*decoding[=.]", o) for o in given):
            decoding = final.get("decoding")
        if max_new is None:
            max_new = final.get("max_new_tokens")
    return RunSettings(batch_size=int(batch), precision=precision, decoding=decoding, max_new_tokens=max_new)


def _recorded_precision(ckpt_dir: Path | None) -> str | None:
    if ckpt_dir is None:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        value = json.loads((ckpt_dir / ADAPTER_CONFIG).read_text()).get("precision")
        return str(value) if value in PRECISIONS else None
    return None


def autocast_for(model: torch.nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The trainer's autocast for a precision (fp32: none); weights keep their own dtype."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def _training_run_id(ckpt_dir: Path | None) -> str | None:
    """The W&B run id the trainer recorded in the checkpoint (trainer_state.json ``wandb_id``), if any."""
    if ckpt_dir is None:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        return json.loads((ckpt_dir / "trainer_state.json").read_text()).get("wandb_id")
    return None


def _wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The logger node as log_to_wandb wants it (only for logger=wandb)."""
    logger_cfg = cfg.get("logger") or {}
    if logger_cfg.get("name") != "wandb":
        return None
    mode = logger_cfg.get("mode") or "auto"
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return {
        "wandb": True,
        "project": logger_cfg.get("project"),
        "entity": logger_cfg.get("entity"),
        "mode": mode,
        "run_id": cfg.get("wandb_run", "auto"),
    }


def _evaluate_generate(
    cfg: DictConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    settings: RunSettings,
    records: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LLM-Adapters protocol on the preset's records; writes predictions and router files."""
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    result = evaluate_records(
        model,
        tokenizer,
        records,
        decoding=settings.decoding,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        collect_router=bool(cfg.get("router_stats", True)),
        router_case=int(cfg.get("router_case") or 0),
        family_max_new_tokens=eval_cfg.get("max_new_tokens"),
        max_new_tokens_cap=cfg.get("max_new_tokens_cap", DEFAULT_MAX_NEW_TOKENS_CAP),
        letter_rule=str(eval_cfg.get("letter_rule") or "first"),
    )
    write_predictions(out_dir / "predictions.jsonl", result.pop("predictions"))
    files: dict[str, Any] = {"predictions": "predictions.jsonl"}
    router = result.pop("router", None)
    cases = result.pop("router_cases", [])
    if router:
        files.update(save_router_outputs(out_dir, router, cases))
    return result, files


def _evaluate_lm_eval(
    cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, settings: RunSettings
) -> dict[str, Any]:
    """lm-eval tasks, reshaped into the same per-dataset rows as the generate protocol."""
    from moa_train.lm_eval_backend import run_lm_eval

    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    output = run_lm_eval(
        model,
        tokenizer,
        list(eval_cfg.get("tasks") or []),
        include_path=eval_cfg.get("include_path"),
        include_defaults=bool(eval_cfg.get("include_defaults", True)),
        limit=eval_cfg.get("limit"),
        num_fewshot=eval_cfg.get("num_fewshot"),
        batch_size=settings.batch_size,
        max_length=eval_cfg.get("max_length"),
        gen_kwargs=eval_cfg.get("gen_kwargs"),
        bootstrap_iters=int(eval_cfg.get("bootstrap_iters") or 0),
        seed=int(eval_cfg.get("seed") or 0),
    )
    rows = output["tasks"]
    n = sum(int(r["n"] or 0) for r in rows.values())
    return {
        "accuracy": None,
        "mean_accuracy": sum(r["accuracy"] for r in rows.values()) / len(rows),
        "n": n,
        "datasets": rows,
        "throughput": {"total_seconds": output["seconds"]},
        "lm_eval": {k: v for k, v in output.items() if k != "tasks"},
    }


def run_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Body of ``moa-eval``: load, evaluate, write results.json (+ predictions, router files), print a table."""
    backend = str(cfg.eval.get("backend") or "generate")
    if backend not in ("generate", "lm_eval"):
        raise MoATrainError(f"eval.backend={backend!r} is not known; choose generate or lm_eval")
    if cfg.get("cpu_threads"):
        # on a shared or small CPU machine, fewer intra-op threads avoid spin-wait contention
        torch.set_num_threads(int(cfg.cpu_threads))
    # everything cheap first (checkpoint, run config, data files), so mistakes surface before the model loads
    ckpt_dir = resolve_checkpoint(cfg.checkpoint) if cfg.get("checkpoint") else None
    run_cfg = find_run_config(ckpt_dir)
    settings = resolve_run_settings(cfg, run_cfg, _recorded_precision(ckpt_dir))
    records = (
        load_eval_records(OmegaConf.to_container(cfg.eval, resolve=True), run_cfg)
        if backend == "generate"
        else []
    )
    model, tokenizer, model_node = load_model_for_eval(cfg, ckpt_dir, settings.precision)
    out_dir = resolve_output_dir(cfg, ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with autocast_for(model, settings.precision):
        if backend == "lm_eval":
            result, files = _evaluate_lm_eval(cfg, model, tokenizer, settings), {}
        else:
            result, files = _evaluate_generate(cfg, model, tokenizer, out_dir, settings, records)
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "eval": str(cfg.eval.get("name") or "eval"),
        "checkpoint": str(ckpt_dir) if ckpt_dir else None,
        "model": OmegaConf.to_container(model_node, resolve=True)
        if isinstance(model_node, DictConfig)
        else model_node,
        "limit": cfg.eval.get("limit"),
        "precision": settings.precision,
        **result,
        "files": {"results": "results.json", **files},
    }
    # the job's own config; a composed `hydra` node (tests, compose API) has unresolvable run-time keys
    job_keys = [str(k) for k in cfg.keys() if k != "hydra"]
    OmegaConf.save(OmegaConf.masked_copy(cfg, job_keys), out_dir / "eval_config.yaml", resolve=True)
    _write_json(out_dir / "results.json", results)
    table = markdown_table(results)
    run_ref = log_to_wandb(results, out_dir, _wandb_settings(cfg), _training_run_id(ckpt_dir))
    print(f"\n{table}\n\nresults: {out_dir / 'results.json'}" + (f"  (W&B run {run_ref})" if run_ref else ""))
    results["output_dir"] = str(out_dir)
    return results
