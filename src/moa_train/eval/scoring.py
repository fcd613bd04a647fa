"""Scoring (LLM-Adapters protocol, method spec E): per-dataset answer rules, token budgets and
:func:`evaluate_records`, the one generate-extract-score implementation (quickstart and moa-eval)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from moa_train.data.answers import AnswerRule, extract, is_correct, rule_for
from moa_train.errors import MoATrainError
from moa_train.eval.decoding import DecodingConfig
from moa_train.eval.generation import Throughput, generate
from moa_train.eval.router_analysis import router_analysis, set_telemetry, telemetry_enabled

# Max new tokens per task family (LLM-Adapters: 256 math, 32 commonsense); moa-eval presets override.
DEFAULT_MAX_NEW_TOKENS = {"math": 256, "commonsense": 32, "arithmetic": 16, "default": 64}
DEFAULT_MAX_NEW_TOKENS_CAP = 256
_ARITHMETIC_NAME = re.compile(r"arith|digit_(addition|subtraction|multiplication|division)")
REQUIRED_FIELDS = ("instruction", "answer")


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
    template: str = "alpaca",
) -> dict[str, Any]:
    """Generate, extract and score ``records`` (LLM-Adapters dicts with ``dataset``); one call per eval.

    Works with a plain HF causal LM or a MoAModel. Returns ``accuracy`` (over all records),
    ``mean_accuracy`` (unweighted over datasets), ``n``, ``correct``, ``datasets`` (per-dataset
    accuracy / n / budget / throughput), ``throughput``, ``predictions`` and, when ``collect_router``
    and the model has router statistics, ``router`` (per dataset) and ``router_cases``.
    ``router_stats`` is the older spelling of ``collect_router`` (docs/CONTRACTS.md). ``template``:
    the prompt template the model was trained with (``data.template``: alpaca | chat).
    """
    if router_stats is not None:
        collect_router = bool(router_stats)
    validate_records(records)
    if not records:
        raise MoATrainError("nothing to evaluate: the record list is empty")
    decoding = DecodingConfig.from_any(decoding)
    router_on = (collect_router or router_case > 0) and hasattr(model, "router_stats")
    was_training, telemetry_was = model.training, telemetry_enabled(model)
    model.eval()
    # per-forward router statistics only slow generation down; the analysis pass collects its own
    set_telemetry(model, False)
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
                    model,
                    tokenizer,
                    subset,
                    decoding=decoding,
                    batch_size=batch_size,
                    max_new_tokens=budget,
                    template=template,
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
        set_telemetry(model, telemetry_was)
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
