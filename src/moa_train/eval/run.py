"""Body of ``moa-eval``: resolve the checkpoint and the base model, load the preset's data, call
:func:`~moa_train.eval.scoring.evaluate_records` (or the lm-eval back-end) and write ``results.json``,
``predictions.jsonl``, ``router_stats.json`` and heat-maps."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moa_train.core.compile import compile_decoding
from moa_train.errors import MoATrainError
from moa_train.eval.checkpoints import (
    RunSettings,
    autocast_for,
    find_run_config,
    load_model_for_eval,
    recorded_precision,
    resolve_checkpoint,
    resolve_run_settings,
    training_run_id,
)
from moa_train.eval.lm_eval_backend import run_lm_eval
from moa_train.eval.outputs import (
    log_to_wandb,
    markdown_table,
    resolve_output_dir,
    save_router_outputs,
    wandb_settings,
    write_json,
    write_predictions,
)
from moa_train.eval.scoring import DEFAULT_MAX_NEW_TOKENS_CAP, evaluate_records
from moa_train.eval.sources import describe_data, load_eval_records

RESULTS_SCHEMA_VERSION = 1


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
        template=settings.template,
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
    settings = resolve_run_settings(cfg, run_cfg, recorded_precision(ckpt_dir))
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    records = load_eval_records(eval_cfg, run_cfg) if backend == "generate" else []
    data = (
        describe_data(eval_cfg, run_cfg, records)
        if records
        else f"eval={eval_cfg.get('name')}: lm-eval tasks"
    )
    model, tokenizer, model_node = load_model_for_eval(cfg, ckpt_dir, settings.precision)
    if cfg.get("compile") and backend == "generate":  # compiled decoding steps (static KV cache)
        compile_decoding(model, cfg.get("compile_mode"))
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
        "data": data,
        "precision": settings.precision,
        "template": settings.template,
        **result,
        "files": {"results": "results.json", **files},
    }
    # the job's own config; a composed `hydra` node (tests, compose API) has unresolvable run-time keys
    job_keys = [str(k) for k in cfg.keys() if k != "hydra"]
    OmegaConf.save(OmegaConf.masked_copy(cfg, job_keys), out_dir / "eval_config.yaml", resolve=True)
    write_json(out_dir / "results.json", results)
    table = markdown_table(results)
    run_ref = log_to_wandb(results, out_dir, wandb_settings(cfg), training_run_id(ckpt_dir))
    print(
        f"\n{data}\n\n{table}\n\nresults: {out_dir / 'results.json'}"
        + (f"  (W&B run {run_ref})" if run_ref else "")
    )
    results["output_dir"] = str(out_dir)
    return results
