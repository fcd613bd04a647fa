"""What a sweeper or launcher leaves in a sweep folder besides the job folders.

- ``hydra/sweeper=optuna``: ``optimization_results.yaml`` (the study's best parameters and value); each
  job's ``.hydra/`` files hold the direction, the searched parameters and ``objective`` (the summary key
  each trial returned). :func:`read_study` turns them and the job folders into one row per trial.
- ``hydra/launcher=submitit_local|submitit_slurm``: ``.submitit/<job id>/<job id>_<task>_log.{out,err}``,
  where a job killed from outside (time limit, out of memory, node failure) leaves its last words;
  :func:`submitit_logs` finds a job's logs from the job id Hydra recorded in ``.hydra/hydra.yaml``.
- ``hydra/launcher=joblib`` and the basic launcher leave only the job folders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # jobs.py reads submitit logs from here: no import back at run time
    from moa_train.report.jobs import Job

RESULTS_NAME = "optimization_results.yaml"


@dataclass
class Trial:
    job: Job
    params: dict[str, str]  # searched parameter -> this trial's value (from its overrides)
    value: float | None  # the objective the job returned (None: failed or no such key)


@dataclass
class Study:
    root: Path
    objective: str | None
    direction: str
    searched: list[str]
    best_params: dict[str, Any] | None  # from optimization_results.yaml (None: the sweep did not finish)
    best_value: float | None
    trials: list[Trial] = field(default_factory=list)

    def best_trial(self) -> Trial | None:
        """The best completed trial of this folder (a stored study may hold better ones from other runs)."""
        done = [t for t in self.trials if t.value is not None]
        if not done:
            return None
        pick = max if self.direction.startswith("max") else min
        return pick(done, key=lambda t: t.value)

    def markdown(self) -> list[str]:
        lines = [f"## Optuna study: {self.root}", ""]
        what = f"`{self.objective}`" if self.objective else "the value the jobs returned"
        lines.append(
            f"Objective: {what}, direction {self.direction}; searched: {', '.join(self.searched) or '?'}."
        )
        if self.best_params is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.best_params.items())
            lines.append(
                f"**Best parameters ({RESULTS_NAME}): {params}; best value {_fmt(self.best_value)}.**"
            )
        else:
            lines.append(
                f"No {RESULTS_NAME}: the study did not finish (a trial failed or it is still running)."
            )
            best = self.best_trial()
            if best is not None:
                params = ", ".join(f"{k}={v}" for k, v in best.params.items())
                lines.append(
                    f"Best completed trial here: {best.job.name} ({params}), value {_fmt(best.value)}."
                )
        lines += ["", "| trial | " + " | ".join(self.searched) + " | objective | status |"]
        lines.append("|---|" + "---:|" * len(self.searched) + "---:|---|")
        for t in self.trials:
            cells = [t.job.name, *[t.params.get(k, "") for k in self.searched], _fmt(t.value), t.job.status]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "trial": t.job.name,
                **t.params,
                "objective": t.value,
                "status": t.job.status,
                "reason": t.job.reason,
            }
            for t in self.trials
        ]


def read_study(root: Path, jobs: list[Job]) -> Study | None:
    """The Optuna study of a sweep folder, or None when the sweep was not an Optuna sweep."""
    # the Optuna sweeper writes no multirun.yaml: its settings are in every job's .hydra/ files
    own = [j for j in jobs if j.path.parent == root]
    first = own[0].path / ".hydra" if own else root / ".hydra"
    multirun = _load(root / "multirun.yaml") or {
        **(_load(first / "config.yaml") or {}),
        **(_load(first / "hydra.yaml") or {}),
    }
    sweeper = _get(multirun, "hydra", "sweeper") or {}
    results = _load(root / RESULTS_NAME)
    if "optuna" not in str(sweeper.get("_target_", "")) and results is None:
        return None
    params = sweeper.get("params")
    searched = [str(k) for k in params] if isinstance(params, dict) else []
    objective = _get(multirun, "objective")
    direction = str(sweeper.get("direction") or "minimize")
    best_params = results.get("best_params") if isinstance(results, dict) else None
    best_value = results.get("best_value") if isinstance(results, dict) else None
    if not searched and isinstance(best_params, dict):
        searched = [str(k) for k in best_params]
    trials = []
    for job in own:
        values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in job.overrides if "=" in o}
        value = job.summary.get(objective) if objective and job.status == "completed" else None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        trials.append(
            Trial(job, {k: values[k] for k in searched if k in values}, float(value) if ok else None)
        )
    return Study(
        root, str(objective) if objective else None, direction, searched,
        best_params if isinstance(best_params, dict) else None, best_value, trials,
    )  # fmt: skip


def submitit_logs(job_dir: Path) -> list[Path]:
    """The submitit logs of a job folder (``<sweep>/.submitit/<job id>/``), stderr first."""
    job_id = _get(_load(job_dir / ".hydra" / "hydra.yaml"), "hydra", "job", "id")
    if not job_id:
        return []
    folder = job_dir.parent / ".submitit" / str(job_id)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*_log.err")) + sorted(folder.glob("*_log.out"))


def _load(path: Path) -> Any:
    """A YAML file as plain data, interpolations left as text (None when absent or damaged)."""
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # damaged: treated as absent, the jobs still report
        return None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.5g}"
