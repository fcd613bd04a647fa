"""lm-evaluation-harness back-end: run ``lm_eval`` tasks on the in-memory (adapted) model.

A MoA checkpoint is not a PEFT adapter, so ``lm_eval --model hf --model_args peft=...`` cannot load
it; instead the already-built model is handed to lm-eval's ``HFLM`` wrapper (``pretrained=<module>``),
which accepts any causal LM whose forward returns ``.logits`` and which has ``.generate``,
``.config`` and ``.device`` (MoAModel forwards those to its base model). Local task YAMLs are found
through ``include_path`` (the ``lm_eval --include_path`` mechanism), so everything runs offline.

Note: lm-eval tasks use their own prompts and mostly log-likelihood scoring; their numbers are not
comparable with the LLM-Adapters generate-and-extract protocol of :mod:`moa_train.eval`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from moa_train.errors import MoATrainError

log = logging.getLogger(__name__)

# Which metric becomes a task's "accuracy" column, in order of preference.
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")


def _split_metric(key: str) -> tuple[str, str]:
    """lm-eval result keys look like ``acc,none`` / ``exact_match,strict-match`` (metric, filter)."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def summarize_task(name: str, metrics: Mapping[str, Any], n: int | None) -> dict[str, Any]:
    """One task's row: its primary metric as ``accuracy`` plus every numeric metric under ``metrics``."""
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not k.split(",")[0].endswith("_stderr")
    }
    if not numeric:
        raise MoATrainError(f"lm-eval task {name} returned no numeric metric")
    by_metric: dict[str, str] = {}
    for key in numeric:
        by_metric.setdefault(_split_metric(key)[0], key)
    primary = next((by_metric[m] for m in PRIMARY_METRICS if m in by_metric), next(iter(numeric)))
    return {"accuracy": numeric[primary], "metric": primary, "n": n, "metrics": numeric}


def _task_manager(include_path: str | Sequence[str] | None, include_defaults: bool = True) -> Any:
    # deferred: optional extra [lm-eval]
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise MoATrainError(f"lm-eval include_path not found: {path}")
    if not paths and not include_defaults:
        raise MoATrainError("eval.include_defaults=false needs eval.include_path=<dir of task YAMLs>")
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    gen_kwargs: Mapping[str, Any] | None = None,
    bootstrap_iters: int = 0,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``tasks`` with lm-eval on ``model``; returns per-task rows and the raw lm-eval results.

    ``bootstrap_iters=0`` skips lm-eval's bootstrap standard errors (minutes on CPU for some metrics);
    ``include_defaults=False`` indexes only ``include_path`` (seconds faster); ``log_samples`` adds
    lm-eval's per-document records under ``samples``.
    """
    # deferred: optional extra [lm-eval]
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = [str(t) for t in tasks]
    if not tasks:
        raise MoATrainError("eval=lm_eval needs eval.tasks=[...] (lm-eval task names)")
    manager = _task_manager(include_path, include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MoATrainError(
            f"lm-eval task(s) not found: {', '.join(unknown)}; check the name or add eval.include_path=<dir of task YAMLs>"
        )
    was_training = model.training
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
    )
    start = time.perf_counter()
    try:
        output = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if output is None:  # only non-zero ranks get None; moa-eval runs in one process
        raise MoATrainError("lm-eval returned no results")
    samples = output.get("n-samples", {})
    rows = {
        name: summarize_task(name, metrics, (samples.get(name) or {}).get("effective"))
        for name, metrics in output["results"].items()
    }
    result = {
        "tasks": rows,
        "seconds": round(seconds, 3),
        "lm_eval_version": _version(),
        "config": {
            "tasks": tasks,
            "include_path": include_path,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
        },
        "raw_results": output["results"],
    }
    if log_samples:
        result["samples"] = output.get("samples", {})
    return result


def _version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"
