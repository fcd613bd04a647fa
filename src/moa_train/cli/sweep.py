"""The multirun summary: a Hydra callback that tabulates every job of a ``-m`` sweep.

Each job writes ``summary.json`` (final metrics) into its folder ``multirun/<date>/<time>/<job>/``;
Hydra keeps the job's overrides in ``<job>/.hydra/overrides.yaml``. When the sweep ends, this
callback writes ``summary.csv`` and ``summary.md`` to the sweep folder: one row per job with its
overrides, its status (completed, failed with its reason, or incomplete: no summary yet, as for a job
a parallel launcher is still running) and its final metrics. The table is also refreshed after every
job, because Hydra's basic sweeper skips ``on_multirun_end`` when a job failed; the table then shows which.
``summary_by_method.{csv,md}`` groups the jobs whose overrides differ only in ``seed=`` and gives
the mean ± sample std over the completed seeds of every numeric final metric (accuracy, loss, tokens/s).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moa_train.cli.sweep_jobs import ERROR_NAME
from moa_train.files import write_atomic
from moa_train.report.methods import mean_std, split_by_settings
from moa_train.rundir import SUMMARY_NAME, holder

log = logging.getLogger(__name__)

FIRST_COLUMNS = ["job", "overrides", "status"]
METHOD_COLUMNS = ["method", "seeds", "completed"]
DONE = ("completed", "dry_run")
SEED_KEYS = ("seed", "+seed", "++seed")


class SweepSummary(Callback):
    """Writes ``summary.csv`` + ``summary.md`` into the sweep folder (no-op for single runs)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.runtime.output_dir).parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            log.info("sweep summary: %s", path)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder (a folder with ``.hydra/overrides.yaml``), in job order."""
    rows = []
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    for job in sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    ):
        try:  # a damaged file marks its job, it never stops the table
            overrides = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        except Exception:  # noqa: BLE001 - not YAML, not UTF-8
            overrides = ["<unreadable .hydra/overrides.yaml>"]
        if not isinstance(overrides, list):
            overrides = ["<unreadable .hydra/overrides.yaml>"]
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(map(str, overrides))}
        summary = job / SUMMARY_NAME
        try:
            data = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None
        except (OSError, ValueError):
            data = {"status": f"failed (unreadable {SUMMARY_NAME})"}
        if isinstance(data, dict):
            row["status"] = data.pop("status", "completed")
            row.update({k: v for k, v in data.items() if not isinstance(v, dict | list)})
        elif data is not None:  # summary.json holds JSON, but not an object
            row["status"] = f"failed ({SUMMARY_NAME} is not a JSON object)"
        elif (job / ERROR_NAME).is_file():  # the job's own one-line reason (cli/sweep_jobs.py)
            row["status"] = "failed"
            row["error"] = _first_line(job / ERROR_NAME)
        else:  # no summary yet: still training, or stopped without one (killed, lost node)
            row["status"] = "incomplete"
        if row["status"] in ("incomplete", "preempted") and holder(job):  # a live process trains it
            row["status"] = "running"
        rows.append(row)
    return rows


def method_rows(rows: list[dict[str, Any]], sweep_dir: Path) -> list[dict[str, Any]]:
    """Group job rows by their overrides without ``seed=``, split by any setting of the jobs' run configs
    in which such jobs still differ (moa_train.report.methods); mean / sample std over completed seeds."""
    keys, seeds = [], []
    for row in rows:
        parts = str(row["overrides"]).split()
        found = [p.split("=", 1)[1] for p in parts if p.split("=", 1)[0] in SEED_KEYS]
        seeds.append(found[0] if found else "")
        keys.append(" ".join(p for p in parts if p.split("=", 1)[0] not in SEED_KEYS))
    keys = split_by_settings([sweep_dir / str(row["job"]) for row in rows], keys)
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, seed, row in zip(keys, seeds, rows):
        groups.setdefault(key, []).append((seed, row))
    methods = []
    for key, members in groups.items():
        done = [r for _, r in members if r.get("status") in DONE]
        method: dict[str, Any] = {
            "method": key or "(defaults)",
            "seeds": ",".join(seed for seed, _ in members if seed),
            "completed": f"{len(done)}/{len(members)}",
        }
        numeric = sorted({k for r in done for k, v in r.items() if _is_number(v) and k != "job"})
        for name in numeric:
            values = [float(r[name]) for r in done if _is_number(r.get(name))]
            method[f"{name}_mean"], method[f"{name}_std"] = mean_std(values)  # the report's own statistic
        methods.append(method)
    return methods


def write_summary(sweep_dir: Path) -> Path | None:
    """Write the per-job and per-method tables for the jobs found in ``sweep_dir``."""
    if not sweep_dir.is_dir():
        return None
    rows = collect_rows(sweep_dir)
    if not rows:
        return None
    _write_table(sweep_dir / "summary", rows, FIRST_COLUMNS)
    _write_table(sweep_dir / "summary_by_method", method_rows(rows, sweep_dir), METHOD_COLUMNS)
    return sweep_dir / "summary.md"


def _write_table(stem: Path, rows: list[dict[str, Any]], first: list[str]) -> None:
    columns = first + sorted({k for r in rows for k in r} - set(first))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(stem.with_suffix(".csv"), text.getvalue())
    # markdown: "mean ± std" in one cell per metric
    shown = [c for c in columns if not c.endswith("_std")]
    lines = ["| " + " | ".join(c.removesuffix("_mean") for c in shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = []
        for c in shown:
            cell = _cell(row.get(c))
            std = row.get(c.removesuffix("_mean") + "_std") if c.endswith("_mean") else None
            cells.append(f"{cell} ± {_cell(std)}" if std is not None else cell)
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def _first_line(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
