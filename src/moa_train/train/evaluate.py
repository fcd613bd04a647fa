"""After training: held-out accuracy of the base model (adapters off) and of the tuned model, with the
same ``evaluate_records`` that ``moa-eval`` uses."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from moa_train.errors import MoATrainError
from moa_train.eval import evaluate_records
from moa_train.files import write_atomic

log = logging.getLogger(__name__)


def final_evaluation(
    cfg: DictConfig,
    model: Any,
    tokenizer: Any,
    records: list[dict],
    autocast: Any,
    run_dir: Path,
    write: bool = True,
) -> dict[str, Any]:
    """Held-out accuracy of the base model (adapters off) and the tuned model with the same
    ``evaluate_records`` that ``moa-eval`` uses; prints ``<name> accuracy: base=<f> tuned=<f>``."""
    ec = cfg.final_eval
    if not records:
        raise MoATrainError(
            f"final_eval.split={ec.split} is empty or missing in data={cfg.data.get('name', '?')}"
        )
    if ec.get("max_records"):
        records = records[: int(ec.max_records)]
    kwargs = dict(
        decoding=ec.decoding,
        batch_size=int(ec.batch_size),
        max_new_tokens=ec.get("max_new_tokens"),
        template=str(cfg.data.get("template") or "alpaca"),  # prompts as in training
    )
    model.eval()
    model.set_telemetry(False)
    results: dict[str, Any] = {"eval_records": len(records)}
    started = time.perf_counter()
    with torch.no_grad(), autocast:
        if ec.get("base", True):
            with model.disable_adapters():
                base = evaluate_records(model, tokenizer, records, **kwargs)
            results["base_accuracy"] = base["accuracy"]
        tuned = evaluate_records(model, tokenizer, records, **kwargs)
    results["tuned_accuracy"] = tuned["accuracy"]
    results["eval_seconds"] = round(time.perf_counter() - started, 1)
    if not write:  # an FSDP rank other than 0: it took part in the forwards, rank 0 reports
        return results
    lines = (json.dumps(prediction, default=str) + "\n" for prediction in tuned.get("predictions", []))
    write_atomic(run_dir / "final_eval_predictions.jsonl", "".join(lines))
    base_text = f"{results['base_accuracy']:.3f}" if "base_accuracy" in results else "n/a"
    line = f"{cfg.name} accuracy: base={base_text} tuned={results['tuned_accuracy']:.3f}"
    log.info(line)
    print(line, flush=True)
    return results
