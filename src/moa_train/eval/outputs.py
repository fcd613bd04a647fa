"""moa-eval outputs: results/predictions/router files (atomic JSON), the markdown table and W&B logging."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from moa_train.files import write_atomic
from moa_train.tracking import start_wandb, wandb_mode

log = logging.getLogger(__name__)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (a crash never leaves a truncated results file); NaN/inf become null."""
    write_atomic(path, json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")


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
    write_atomic(
        path, "".join(json.dumps(_json_safe(dict(row)), ensure_ascii=False) + "\n" for row in predictions)
    )


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
    # deferred: matplotlib loads only when a heatmap is drawn
    from moa_train.eval.plots import save_heatmap

    write_json(out_dir / "router_stats.json", router)
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
        write_json(out_dir / "router_cases.json", {"experts": experts, "cases": list(cases)})
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
        import wandb  # deferred: only a W&B evaluation needs it

        wanted = logger_cfg.get("run_id")
        resume_id = run_id if wanted in (None, "auto") else str(wanted)
        run = start_wandb(
            mode=logger_cfg.get("mode"),
            run_id=resume_id,
            project=logger_cfg.get("project"),
            entity=logger_cfg.get("entity"),
            job_type="eval",
            dir=str(logger_cfg.get("dir") or out_dir),
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


def wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The logger node as log_to_wandb wants it (only for logger=wandb)."""
    logger_cfg = cfg.get("logger") or {}
    if logger_cfg.get("name") != "wandb":
        return None
    return {
        "wandb": True,
        "project": logger_cfg.get("project"),
        "entity": logger_cfg.get("entity"),
        "mode": wandb_mode(logger_cfg.get("mode")),
        "run_id": cfg.get("wandb_run", "auto"),
    }
