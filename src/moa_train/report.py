"""``moa-report <sweep dir>``: one results table (markdown + CSV) and a bar chart for a sweep.

A sweep is what ``moa-train -m experiment=a,b seed=0,125,1225 ...`` leaves in
``multirun/<date>/<time>/``: one folder per job with ``.hydra/overrides.yaml`` and, when the job
finished, ``summary.json``. Jobs are grouped into methods by their overrides without ``seed=``; the
overrides every job shares are printed once above the table. Per method the report gives:

- the trainable-parameter count,
- the accuracy per dataset and the unweighted mean over datasets (the paper's convention), each as
  mean ± sample std over the completed seeds,
- the training throughput (tokens/s) and the peak memory, when the trainer recorded them.

Accuracies come from the newest ``moa-eval`` results found inside a job (``<job>/final/eval/<preset>/
results.json``, choose one with ``--eval NAME``), else from the trainer's final evaluation
(``final_eval_predictions.jsonl`` + ``summary.json``). Partial sweeps work: jobs without a summary
(failed, or still running) are listed under the table with the reason found in their folder, never
dropped silently. A single mixed dataset (an embedded BIG-bench mix) is split into its tasks. A
moa-eval evaluation of the base model in ``<sweep dir>/base_model/`` (or ``--base``) becomes the
first row. Outputs (into the first sweep dir, or ``--out``): ``report.md``, ``report.csv`` (one row
per method), ``report_jobs.csv`` (one row per job) and ``report.png``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_train.errors import ArgumentParser, entry_point

SUMMARY = "summary.json"
PREDICTIONS = "final_eval_predictions.jsonl"
SEED_KEYS = ("seed", "+seed", "++seed")
MEMORY_KEY = re.compile(r"(peak|max).*mem|mem.*(peak|max)", re.IGNORECASE)
ERROR_LINE = re.compile(r"(error|exception|traceback|killed|out of memory)", re.IGNORECASE)


class ReportError(Exception):
    """A problem the user can fix (bad folder, nothing to report)."""


# ----------------------------------------------------------------------------------------------------
# Reading one job
# ----------------------------------------------------------------------------------------------------


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
    from omegaconf import OmegaConf

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
    for key in ("error", "message", "reason"):
        if summary.get(key):
            return " ".join(str(summary[key]).split())[:300]
    candidates = [job_dir / "error.txt", *sorted(job_dir.glob("*.log")), *sorted(job_dir.glob("*.err"))]
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
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data.get("datasets"), dict):
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
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def accuracy_by_group(
    predictions: list[dict[str, Any]], task_map: dict[str, str] | None = None
) -> dict[str, float]:
    """Accuracy per dataset; a single mixed dataset (e.g. an embedded BIG-bench mix) is split into its
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
    from omegaconf import OmegaConf

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
        if not isinstance(data, dict) or data.get("source") != "bigbench" or len(data.get("tasks") or []) < 2:
            continue
        key = json.dumps(data, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
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
        try:
            summary = json.loads((job_dir / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            summary = {"status": "failed", "error": f"unreadable summary.json: {exc}"}
        status = str(summary.get("status", "completed"))
    else:
        status = "incomplete"
    job = Job(
        path=job_dir,
        name=str(job_dir.relative_to(root)) if job_dir != root else job_dir.name,
        overrides=overrides,
        seed=_seed_of(overrides, job_dir),
        status=status,
        summary=summary,
    )
    if status != "completed":
        job.reason = _failure_reason(job_dir, summary) if status != "dry_run" else "dry run (no training)"
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


# ----------------------------------------------------------------------------------------------------
# Grouping into methods
# ----------------------------------------------------------------------------------------------------


def method_labels(jobs: list[Job]) -> list[str]:
    """Label every job by its overrides minus ``seed=`` and minus the overrides all jobs share;
    returns the shared overrides."""
    if not jobs:
        return []
    lists = [[o for o in j.overrides if _override_key(o) not in SEED_KEYS] for j in jobs]
    common = [o for o in lists[0] if all(o in rest for rest in lists[1:])]
    for job, own in zip(jobs, lists):
        rest = [o for o in own if o not in common]
        parts = [o.split("=", 1)[1] if _override_key(o) in ("experiment", "+experiment") else o for o in rest]
        experiment = [o.split("=", 1)[1] for o in own if _override_key(o) in ("experiment", "+experiment")]
        job.method = (
            " ".join(parts)
            or (experiment[0] if experiment else _job_config_value(job.path, "name"))
            or "(default)"
        )
    return common


def _job_config_value(job_dir: Path, key: str) -> str | None:
    """A top-level scalar of the job's composed config (``.hydra/config.yaml``), read as text."""
    config = job_dir / ".hydra" / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        match = re.search(rf"^{re.escape(key)}:\s*(\S+)", text, re.M)
        if match:
            return match.group(1)
    return None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Method:
    label: str
    jobs: list[Job]
    datasets: list[str]

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.ok]

    def accuracy(self, dataset: str | None) -> tuple[float | None, float | None]:
        if dataset is None:
            return mean_std([j.mean_accuracy for j in self.done if j.mean_accuracy is not None])
        return mean_std([j.datasets[dataset] for j in self.done if dataset in j.datasets])

    def summary_value(self, key: str) -> tuple[float | None, float | None]:
        return mean_std([float(j.summary[key]) for j in self.done if _is_number(j.summary.get(key))])

    def params(self) -> int | None:
        counts = {
            int(j.summary["trainable_params"])
            for j in self.jobs
            if _is_number(j.summary.get("trainable_params"))
        }
        return max(counts) if counts else None

    def peak_memory_mb(self) -> float | None:
        values = [m for j in self.done if (m := _peak_memory_mb(j)) is not None]
        return max(values) if values else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _peak_memory_mb(job: Job) -> float | None:
    """Peak memory the trainer recorded (any ``*peak*mem*`` key of summary.json), in MiB."""
    for key, value in job.summary.items():
        if MEMORY_KEY.search(key) and _is_number(value):
            low = key.lower()
            if "gib" in low or low.endswith("_gb"):
                return float(value) * 1024
            if "bytes" in low or low.endswith("_b"):
                return float(value) / 2**20
            return float(value)  # *_mb / *_mib (the trainer's unit)
    return None


def group_methods(jobs: list[Job]) -> list[Method]:
    order: dict[str, list[Job]] = {}
    for job in jobs:
        order.setdefault(job.method, []).append(job)
    datasets = sorted({d for j in jobs for d in j.datasets})
    return [Method(label, members, datasets) for label, members in order.items()]


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * mean:.1f}"


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if value is None else fmt.format(value)


@dataclass
class Report:
    roots: list[Path]
    jobs: list[Job]
    common: list[str]
    methods: list[Method]

    @property
    def datasets(self) -> list[str]:
        return self.methods[0].datasets if self.methods else []

    def has_base(self) -> bool:
        return any(_is_number(j.summary.get("base_accuracy")) for j in self.jobs)

    def markdown(self) -> str:
        ds = self.datasets
        head = ["method", "seeds", "trainable params"]
        head += [*ds, "mean"]
        head += ["tokens/s", "peak mem (MiB)"]
        lines = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for m in self.methods:
            tps, _ = m.summary_value("train/tokens_per_s")
            cells = [
                m.label.replace("|", "\\|"),
                "–" if m.label == BASE_LABEL else f"{len(m.done)}/{len(m.jobs)}",
                _num(m.params()),
                *[_pct(*m.accuracy(d)) for d in ds],
                _pct(*m.accuracy(None)),
                _num(tps),
                _num(m.peak_memory_mb()),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        text = [
            f"# moa-report: {', '.join(str(r) for r in self.roots)}",
            "",
            f"{len(self.jobs)} jobs, {sum(j.ok for j in self.jobs)} completed with results, "
            f"{len(self.methods)} methods."
            + (f" Overrides shared by all jobs: `{' '.join(self.common)}`." if self.common else ""),
            "Accuracy in % per dataset: mean ± sample std over the completed seeds (one value: a single "
            "seed); mean = unweighted mean over datasets. tokens/s: training throughput.",
            "",
            *lines,
        ]
        if self.has_base():
            base, _ = mean_std(
                [
                    float(j.summary["base_accuracy"])
                    for j in self.jobs
                    if _is_number(j.summary.get("base_accuracy"))
                ]
            )
            text += ["", f"Base model (adapters off), same evaluation records: {_pct(base, None)} %."]
        sources = sorted({j.eval_source for j in self.jobs if j.eval_source})
        if sources:
            text += ["", "Accuracy source: " + ", ".join(f"`{s}`" for s in sources) + "."]
        bad = [j for j in self.jobs if not j.ok]
        text += ["", f"## Failed or incomplete jobs ({len(bad)})", ""]
        if bad:
            text += ["| job | overrides | status | reason |", "|---|---|---|---|"]
            for j in bad:
                text.append(
                    f"| {j.name} | `{' '.join(j.overrides)}` | {j.status} | {j.reason.replace('|', '/')} |"
                )
        else:
            text.append("none")
        text += ["", "## Jobs", ""]
        text += [
            "| job | method | seed | status | mean acc % | tokens/s | train s |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for j in self.jobs:
            tps = j.summary.get("train/tokens_per_s")
            secs = j.summary.get("train_seconds")
            acc = j.mean_accuracy if j.ok else None
            text.append(
                f"| {j.name} | {j.method} | {j.seed or ''} | {j.status} | {_pct(acc, None)} | "
                f"{_num(tps if _is_number(tps) else None)} | {_num(secs if _is_number(secs) else None)} |"
            )
        return "\n".join(text) + "\n"

    def method_rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.methods:
            row: dict[str, Any] = {
                "method": m.label,
                "seeds_completed": len(m.done),
                "jobs": len(m.jobs),
                "failed_jobs": " ".join(j.name for j in m.jobs if not j.ok),
                "trainable_params": m.params(),
            }
            for d in [*m.datasets, None]:
                mean, std = m.accuracy(d)
                key = f"acc_{d}" if d else "mean_acc"
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            for key, col in (("train/tokens_per_s", "tokens_per_s"), ("train_seconds", "train_seconds")):
                row[col] = m.summary_value(key)[0]
            row["peak_memory_mb"] = m.peak_memory_mb()
            rows.append(row)
        return rows

    def job_rows(self) -> list[dict[str, Any]]:
        rows = []
        for j in self.jobs:
            row: dict[str, Any] = {
                "job": j.name,
                "method": j.method,
                "seed": j.seed,
                "status": j.status,
                "reason": j.reason,
                "overrides": " ".join(j.overrides),
                "trainable_params": j.summary.get("trainable_params"),
                "mean_acc": j.mean_accuracy if j.ok else None,
                "base_accuracy": j.summary.get("base_accuracy"),
                "tokens_per_s": j.summary.get("train/tokens_per_s"),
                "peak_memory_mb": _peak_memory_mb(j),
                "train_seconds": j.summary.get("train_seconds"),
                "eval_records": j.n_eval,
                "eval_source": j.eval_source,
            }
            for d in self.datasets:
                row[f"acc_{d}"] = j.datasets.get(d)
            rows.append(row)
        return rows

    def plot(self, path: Path) -> Path | None:
        methods = [m for m in self.methods if m.done]
        if not methods:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups: list[str | None] = [*self.datasets, None] if len(self.datasets) > 1 else [None]
        width = 0.8 / len(methods)
        width_in = min(14.0, max(6.0, 2.0 + 0.3 * len(groups) * len(methods)))
        fig, ax = plt.subplots(figsize=(width_in, 5.0))
        try:
            for i, m in enumerate(methods):
                means, errs, xs = [], [], []
                for g, d in enumerate(groups):
                    mean, std = m.accuracy(d)
                    x = g + (i - (len(methods) - 1) / 2) * width
                    xs.append(x)
                    means.append(100 * (mean or 0.0))
                    errs.append(100 * (std or 0.0))
                    seeds = [j.datasets.get(d) if d else j.mean_accuracy for j in m.done]
                    seeds = [100 * v for v in seeds if v is not None]
                    if len(seeds) > 1:
                        ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
                color = "lightgrey" if m.label == BASE_LABEL else None
                ax.bar(xs, means, width=width * 0.95, yerr=errs, capsize=3, label=m.label, color=color)
            ax.set_xticks(
                range(len(groups)), [d or "mean" for d in groups], rotation=20 if len(groups) > 4 else 0
            )
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(bottom=0)
            ax.set_title("accuracy: mean ± std over seeds (dots: single seeds)")
            if self.has_base():
                base, _ = mean_std(
                    [
                        float(j.summary["base_accuracy"])
                        for j in self.jobs
                        if _is_number(j.summary.get("base_accuracy"))
                    ]
                )
                if base is not None and groups == [None]:
                    ax.axhline(100 * base, color="grey", linestyle="--", linewidth=1, label="base model")
            ax.legend(fontsize=8, loc="best")
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fig.savefig(tmp, format="png", dpi=110)
            tmp.replace(path)
        finally:
            plt.close(fig)
        return path


BASE_LABEL = "base model (no adapters)"


def read_base(path: Path, task_map: dict[str, str] | None = None) -> Job | None:
    """A moa-eval evaluation of the base model alone (a results.json, or the folder holding it)."""
    results = path / "results.json" if path.is_dir() else path
    if not results.is_file():
        return None
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
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


def build_report(roots: list[Path], eval_name: str | None = None, base: Path | None = None) -> Report:
    job_dirs = [(root, d) for root in roots for d in find_jobs(root)]
    if not job_dirs:
        raise ReportError(
            f"no job folders (with .hydra/overrides.yaml or summary.json) under {', '.join(map(str, roots))}"
        )
    task_map = task_map_for([d for _, d in job_dirs])
    jobs = [read_job(d, root, eval_name, task_map) for root, d in job_dirs]
    common = method_labels(jobs)
    methods = group_methods(jobs)
    base_job = None
    for candidate in [base] if base is not None else [r / "base_model" for r in roots]:
        base_job = read_base(candidate, task_map)
        if base_job is not None:
            break
    if base is not None and base_job is None:
        raise ReportError(f"--base {base}: no moa-eval results.json with per-dataset accuracy there")
    if base_job is not None:
        datasets = sorted({d for j in [*jobs, base_job] for d in j.datasets})
        methods = [Method(BASE_LABEL, [base_job], datasets)] + [
            Method(m.label, m.jobs, datasets) for m in methods
        ]
    return Report(roots, jobs, common, methods)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_report(report: Report, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "jobs_csv": out_dir / "report_jobs.csv",
    }
    paths["markdown"].write_text(report.markdown(), encoding="utf-8")
    _write_csv(paths["csv"], report.method_rows())
    _write_csv(paths["jobs_csv"], report.job_rows())
    if plot:
        png = report.plot(out_dir / "report.png")
        if png is not None:
            paths["png"] = png
    return paths


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="moa-report",
        description="Tabulate a moa-train sweep: per method, accuracy per dataset (mean ± std over seeds), "
        "trainable params, tokens/s, peak memory; failed jobs are listed. Writes report.md, report.csv, "
        "report_jobs.csv and report.png.",
    )
    parser.add_argument(
        "sweep_dirs", nargs="+", type=Path, help="sweep folder(s), e.g. multirun/<date>/<time>"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the first sweep folder)"
    )
    parser.add_argument(
        "--eval", dest="eval_name", default=None, help="use moa-eval results of this preset only"
    )
    parser.add_argument(
        "--base", type=Path, default=None,
        help="moa-eval results of the base model (default: <sweep dir>/base_model/ when present)",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="skip the bar chart")
    args = parser.parse_args(argv)
    try:
        report = build_report(list(args.sweep_dirs), args.eval_name, args.base)
        paths = write_report(report, args.out or args.sweep_dirs[0], plot=not args.no_plot)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(report.markdown().split("\n## Jobs")[0].rstrip())
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
