"""Reading a sweep: its job folders, each job's overrides, status, summary and accuracies per dataset."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa_train.report.sweeps import submitit_logs  # a job killed under submitit: its launcher's logs
from moa_train.rundir import SUMMARY_NAME, holder

SUMMARY = SUMMARY_NAME  # the run folder's summary, named by rundir
PREDICTIONS = "final_eval_predictions.jsonl"
SEED_KEYS = ("seed", "+seed", "++seed")
MEMORY_KEY = re.compile(r"(peak|max).*mem|mem.*(peak|max)", re.IGNORECASE)
TASK_SOURCES = ("arithmetic", "packaged", "bigbench")  # data sources whose records carry a task
ERROR_LINE = re.compile(r"(error|exception|traceback|killed|out of memory)", re.IGNORECASE)


class ReportError(Exception):
    """A problem the user can fix (bad folder, nothing to report)."""


@dataclass
class Job:
    path: Path
    name: str  # path relative to the sweep folder
    overrides: list[str]
    seed: str | None
    status: str  # completed | failed | incomplete | dry_run | ...
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, float] = field(default_factory=dict)  # dataset -> accuracy
    n_eval: int | None = None
    eval_source: str = ""
    method: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "completed" and bool(self.datasets or self.summary)

    @property
    def mean_accuracy(self) -> float | None:
        """Unweighted mean over datasets (the paper's 6-set / 8-set mean)."""
        if self.datasets:
            return statistics.fmean(self.datasets.values())
        value = self.summary.get("tuned_accuracy")
        return float(value) if isinstance(value, int | float) else None


def _load_yaml_list(path: Path) -> list[str]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - a broken file is reported as an empty override list
        return []
    return [str(x) for x in (data or [])]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0]


def _seed_of(overrides: list[str], job_dir: Path) -> str | None:
    for o in overrides:
        if _override_key(o) in SEED_KEYS:
            return o.split("=", 1)[1]
    return _job_config_value(job_dir, "seed")


def _failure_reason(job_dir: Path, summary: dict[str, Any]) -> str:
    """The most useful line that explains why a job has no results."""
    if summary.get("status") == "preempted" and summary.get("stop_message"):
        return f"{summary['stop_message']}; run the same sweep again to resume it"
    for key in ("error", "message", "reason"):
        if summary.get(key):
            return " ".join(str(summary[key]).split())[:300]
    candidates = [job_dir / "error.txt", *sorted(job_dir.glob("*.log")), *sorted(job_dir.glob("*.err"))]
    candidates += submitit_logs(job_dir)
    for path in candidates:
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        hits = [ln.strip() for ln in lines if ERROR_LINE.search(ln)]
        if hits:
            return hits[-1][:300]
    logs = [p for p in candidates if p.is_file() and p.stat().st_size]
    if logs:
        last = logs[-1].read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if last:
            return f"no summary.json (failed or still running); last log line: {last[-1].strip()[:200]}"
    return "no summary.json (failed or still running)"


def _eval_results(job_dir: Path, eval_name: str | None) -> tuple[dict[str, Any], Path] | None:
    """The newest moa-eval results.json inside the job (optionally of one eval preset)."""
    found = []
    for path in job_dir.glob("**/eval/*/results.json"):
        if eval_name and path.parent.name != eval_name:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged or not UTF-8: not a usable result
            continue
        if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
            found.append((path.stat().st_mtime, data, path))
    if not found:
        return None
    _, data, path = max(found, key=lambda t: t[0])
    return data, path


def _read_predictions(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL file (the trainer's final evaluation or moa-eval)."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def accuracy_by_group(
    predictions: list[dict[str, Any]], task_map: dict[str, str] | None = None
) -> dict[str, float]:
    """Accuracy per dataset; a single mixed dataset (e.g. ``arith_mix``) is split into its
    tasks when the predictions carry ``task`` or ``task_map`` (instruction -> task) covers them all."""
    if not predictions:
        return {}
    datasets = {str(p.get("dataset") or "default") for p in predictions}

    def key(p: dict[str, Any]) -> str:
        return str(p.get("dataset") or "default")

    if len(datasets) == 1:
        if all(p.get("task") for p in predictions):

            def key(p: dict[str, Any]) -> str:
                return _short_task(str(p["task"]))

        elif task_map and all(p.get("instruction") in task_map for p in predictions):

            def key(p: dict[str, Any]) -> str:
                return task_map[p["instruction"]]

    hits: dict[str, list[int]] = {}
    for p in predictions:
        hits.setdefault(key(p), []).append(1 if p.get("correct") else 0)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def _short_task(task: str) -> str:
    return task.rstrip("/").split("/")[-1]


def task_map_for(job_dirs: list[Path]) -> dict[str, str]:
    """instruction -> task of the held-out records of every BIG-bench mix the jobs trained on (read
    from each job's ``.hydra/config.yaml``; empty when there is none or the data cannot be loaded)."""
    mapping: dict[str, str] = {}
    seen: set[str] = set()
    for job_dir in job_dirs:
        config = job_dir / ".hydra" / "config.yaml"
        if not config.is_file():
            continue
        try:
            data = OmegaConf.to_container(OmegaConf.load(config).get("data"), resolve=True)
        except Exception:  # noqa: BLE001 - unreadable or unresolvable: no task breakdown
            continue
        if (
            not isinstance(data, dict)
            or data.get("source") not in TASK_SOURCES
            or len(data.get("tasks") or []) < 2
        ):
            continue
        key = json.dumps(data, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            # deferred: moa_train.data loads torch; only a report on a multi-task mix needs it
            from moa_train.data import load_splits

            for record in load_splits(data).get("test", []):
                if record.get("task"):
                    mapping.setdefault(record["instruction"], _short_task(str(record["task"])))
        except Exception:  # noqa: BLE001 - the BIG-bench cache is optional for a report
            continue
    return mapping


def read_job(
    job_dir: Path, root: Path, eval_name: str | None = None, task_map: dict[str, str] | None = None
) -> Job:
    overrides = _load_yaml_list(job_dir / ".hydra" / "overrides.yaml")
    summary: dict[str, Any] = {}
    if (job_dir / SUMMARY).is_file():
        try:  # a damaged file lists the job as failed, naming the file (ValueError: JSON or UTF-8)
            summary = json.loads((job_dir / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            summary = {"status": "failed", "error": f"unreadable {job_dir / SUMMARY}: {exc}"}
        if not isinstance(summary, dict):
            summary = {"status": "failed", "error": f"{job_dir / SUMMARY} is not a JSON object"}
        status = str(summary.get("status", "completed"))
    else:
        status = "incomplete"
    running = holder(job_dir) if status in ("incomplete", "preempted") else None
    if running:  # a live process holds the job's lock: training, or resumed after a preemption
        status = "running"
    job = Job(
        path=job_dir,
        name=str(job_dir.relative_to(root)) if job_dir != root else job_dir.name,
        overrides=overrides,
        seed=_seed_of(overrides, job_dir),
        status=status,
        summary=summary,
    )
    if status != "completed":
        job.reason = (
            f"in progress ({running})"
            if running
            else (_failure_reason(job_dir, summary) if status != "dry_run" else "dry run (no training)")
        )
        return job
    evaluated = _eval_results(job_dir, eval_name)
    if evaluated is not None:
        data, path = evaluated
        preds = _read_predictions(path.parent / "predictions.jsonl")
        job.datasets = accuracy_by_group(preds, task_map) or {
            k: float(v["accuracy"]) for k, v in data["datasets"].items() if "accuracy" in v
        }
        job.n_eval = data.get("n")
        job.eval_source = str(path.relative_to(job_dir))
    else:
        preds = _read_predictions(job_dir / PREDICTIONS)
        if preds:
            job.datasets, job.n_eval = accuracy_by_group(preds, task_map), len(preds)
            job.eval_source = PREDICTIONS
        elif "tuned_accuracy" in summary:
            job.eval_source = SUMMARY
            job.n_eval = summary.get("eval_records")
    if not job.datasets and "tuned_accuracy" not in summary:
        job.reason = "completed without an evaluation (final_eval disabled and no moa-eval results)"
    return job


def find_jobs(root: Path) -> list[Path]:
    """Job folders under ``root``: folders holding ``.hydra/overrides.yaml`` or ``summary.json``."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; pass a sweep folder such as multirun/<date>/<time>")
    found = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    found |= {p.parent for p in root.glob("**/" + SUMMARY)}
    # a job's own sub-folders (checkpoints, eval outputs) are not jobs
    jobs = sorted(p for p in found if not any(q != p and q in p.parents for q in found))
    return sorted(jobs, key=lambda p: _natural(p.relative_to(root).parts if p != root else (p.name,)))


def _natural(parts: tuple[str, ...]) -> tuple:
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in parts)


BASE_LABEL = "base model (no adapters)"


def read_base(path: Path, task_map: dict[str, str] | None = None) -> Job | None:
    """A moa-eval evaluation of the base model alone (a results.json, or the folder holding it)."""
    results = path / "results.json" if path.is_dir() else path
    if not results.is_file():
        return None
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    preds = _read_predictions(results.parent / "predictions.jsonl")
    datasets = accuracy_by_group(preds, task_map) or {
        k: float(v["accuracy"]) for k, v in (data.get("datasets") or {}).items() if "accuracy" in v
    }
    if not datasets:
        return None
    return Job(
        path=results.parent, name=str(results.parent), overrides=[], seed=None, status="completed",
        summary={"trainable_params": 0}, datasets=datasets, n_eval=data.get("n"),
        eval_source=str(results), method=BASE_LABEL,
    )  # fmt: skip


def _job_config_value(job_dir: Path, key: str) -> str | None:
    """A top-level scalar of the job's composed config (``.hydra/config.yaml``), read as text."""
    config = job_dir / ".hydra" / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        match = re.search(rf"^{re.escape(key)}:\s*(\S+)", text, re.M)
        if match:
            return match.group(1)
    return None
