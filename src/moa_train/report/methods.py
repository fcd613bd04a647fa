"""Grouping jobs into methods (their overrides without ``seed=``) with mean ± std over seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from moa_train.report.jobs import MEMORY_KEY, SEED_KEYS, Job, _job_config_value, _override_key


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
