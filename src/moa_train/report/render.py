"""The report: markdown and CSV tables and the bar chart; writing them."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_train.files import atomic_path, write_atomic
from moa_train.report.jobs import BASE_LABEL, Job
from moa_train.report.methods import Method, _is_number, _peak_memory_mb, mean_std
from moa_train.report.sweeps import Study


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
    studies: list[Study] = field(default_factory=list)  # Optuna sweeps among the folders

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
        for study in self.studies:
            text += ["", *study.markdown()]
        bad = [j for j in self.jobs if not j.ok]
        text += ["", f"## Failed, running or incomplete jobs ({len(bad)})", ""]
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
        # deferred: matplotlib is heavy; loads only when the plot is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: after matplotlib.use, which must come first

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
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
        finally:
            plt.close(fig)
        return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def write_report(report: Report, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "jobs_csv": out_dir / "report_jobs.csv",
    }
    write_atomic(paths["markdown"], report.markdown())
    _write_csv(paths["csv"], report.method_rows())
    _write_csv(paths["jobs_csv"], report.job_rows())
    if report.studies:
        paths["trials_csv"] = out_dir / "report_trials.csv"
        _write_csv(paths["trials_csv"], [row for s in report.studies for row in s.rows()])
    if plot:
        png = report.plot(out_dir / "report.png")
        if png is not None:
            paths["png"] = png
    return paths
