"""Grouping jobs into methods (their overrides without ``seed=``) with mean ± std over seeds.

Overrides alone can hide a difference: a preset may set a value per job (the leaderboard's phase 2 takes
each method's rate from a block that grows between sittings, so two of its jobs with the same overrides
may train at different rates). Jobs of one label whose run configs differ in a setting are therefore
split by it, and the label names it (``... optimizer.lr=0.003``): seeds are averaged only over one
configuration. Seeds themselves (``seed``, ``data.seed``) and the keys that only say how a job was
started (:data:`moa_train.rundir.NOT_THE_JOB`) never split a method."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moa_train.report.jobs import MEMORY_KEY, SEED_KEYS, Job, _job_config_value, _override_key
from moa_train.rundir import CONFIG_NAME, NOT_THE_JOB, flatten


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
    for job, label in zip(jobs, split_by_settings([j.path for j in jobs], [j.method for j in jobs])):
        job.method = label
    return common


def split_by_settings(job_dirs: list[Path], labels: list[str]) -> list[str]:
    """``labels`` (one per job folder) with `` key=value`` appended for every setting in which jobs of the
    same label differ (see the module doc); jobs without a run config keep their label."""
    out = list(labels)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        configs = [(i, flat) for i in members if (flat := _settings(job_dirs[i]))]
        if len(configs) < 2:
            continue
        # a key that only some runs have (a newer moa_train's option) does not split them
        shared = set.intersection(*(set(flat) for _, flat in configs))
        differing = sorted(
            k for k in shared if not _not_a_setting(k) and len({repr(flat[k]) for _, flat in configs}) > 1
        )
        for i, flat in configs:
            out[i] = label + "".join(f" {k}={flat[k]}" for k in differing)
    return out


def _not_a_setting(key: str) -> bool:
    return key.rpartition(".")[2] == "seed" or key.split(".")[0] in (*NOT_THE_JOB, "hydra")


def _settings(job_dir: Path) -> dict[str, Any]:
    """The job's resolved run config (``<job>/config.yaml``, written when it starts), flattened."""
    path = job_dir / CONFIG_NAME
    try:
        return flatten(yaml.safe_load(path.read_text(encoding="utf-8"))) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


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
