"""One job of a ``moa-train -m`` sweep, whatever launches it (basic, joblib, submitit) or sweeps it (Optuna).

**What a job returns.** Hydra hands the task function's return value to the sweeper. With
``objective=<key>`` (``sweep=lr_search`` sets ``val/loss``) a job returns that key of its
``summary.json`` as a float, which is what ``hydra/sweeper=optuna`` minimises; with ``objective=null``
it returns the whole summary, as a single run does. An Optuna sweep without an objective is refused
before any job starts (``moa_train.cli.sweep_checks``).

**Re-entering a job folder.** A sweep job's folder is fixed by the sweep (``hydra.sweep.dir`` and
``hydra.sweep.subdir``), so it may already hold a run: the same sweep started again with the same
``hydra.sweep.dir`` (the leaderboard is continued that way), or a SLURM job that submitit requeued
after a preemption or a time limit. If that run has the same config, a finished run is skipped (its
summary is returned), a run with a complete checkpoint is resumed exactly from the newest one, and a
run without any checkpoint starts again. A different config is refused: that folder belongs to
another job. A job that another process is still running (it holds the run's lock, ``run.lock``) is
skipped with a warning naming that process, and nothing of its run is touched: two invocations of one
sweep, or a sweep started again while its first invocation still runs, never train one job twice.
Under submitit the job waits for the lock first, as a requeued job's predecessor may still be exiting.

**Requeueing under submitit.** SLURM warns a job ``hydra.launcher.signal_delay_s`` seconds before its
time limit with SIGUSR2 (submitit's signal). The training loop treats it like SIGTERM: it finishes the
optimizer step, saves a checkpoint and stops; this module then hands the signal back to submitit,
which requeues the same job, and the requeued job resumes from that checkpoint (see above).

**Failures** are written to ``<job dir>/error.txt`` (one line) before they go back to Hydra, so that
``summary.csv`` and ``moa-report`` name the reason whichever process ran the job.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from moa_train import rundir
from moa_train.cli.sweep_checks import OPTUNA_SWEEPER
from moa_train.errors import MoATrainError, Preempted, one_line
from moa_train.files import write_atomic

log = logging.getLogger(__name__)

ERROR_NAME = "error.txt"  # a failed job's reason, one line (moa-report and summary.csv show it)


class ForeignRun(MoATrainError):
    """The job's folder holds another job's run: refused, and that run is left exactly as it is."""


def objective_value(cfg: DictConfig, summary: Any) -> Any:
    """What the job returns to the sweeper: ``summary[objective]`` as a float, or the whole summary."""
    key = cfg.get("objective")
    if not key or not isinstance(summary, dict) or summary.get("status") == "dry_run":
        return summary
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        numbers = sorted(
            k for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise MoATrainError(
            f"objective={key}: the job's summary.json has no number {key!r}; set objective= to one of "
            f"{', '.join(numbers) or '(none)'}"
        )
    return float(value)


def existing_run(cfg: DictConfig, run_dir: Path, config_text: str) -> dict[str, Any] | None:
    """A sweep job whose folder already holds a run (see the module notes).

    Returns the summary of a finished run (the job is skipped), or None after setting ``cfg.resume``
    to the newest complete checkpoint (or leaving it unset: no checkpoint, the job starts again).
    """
    config_path = run_dir / rundir.CONFIG_NAME
    try:
        saved = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoATrainError(
            f"{config_path} is unreadable ({exc}); remove {run_dir} to run the job again"
        ) from None
    changed = _changed_keys(saved, config_text)
    if changed:
        key, before, now = changed[0]
        raise ForeignRun(
            f"{run_dir} already holds a run with another config ({key}={now} here, {before} there); pass "
            "hydra.sweep.dir=<new folder> (a sweep continues in its folders only with the same options)"
        )
    summary = rundir.read_summary(run_dir) if (run_dir / rundir.SUMMARY_NAME).is_file() else {}
    final = run_dir / "final" / rundir.STATE_NAME
    if summary.get("status") == "completed" and final.is_file():
        log.info("%s: finished earlier (summary.json), skipped", run_dir)
        return summary
    checkpoint = rundir.latest_checkpoint(run_dir)
    if checkpoint is not None:
        log.info("%s: resuming from %s", run_dir, checkpoint)
        OmegaConf.update(cfg, "resume", str(checkpoint), force_add=True)
    else:
        log.info("%s: no complete checkpoint, starting the job again", run_dir)
    (run_dir / ERROR_NAME).unlink(missing_ok=True)
    return None


def recorded_job(cfg: DictConfig, hydra_cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """``skip_recorded=<records folder>``: a job whose completed record is there (written by
    ``python -m moa_train.report.leaderboard collect``, for the same budget) is not trained again, so a
    fresh clone continues a committed leaderboard instead of rerunning it. Returns what the job returns
    to the sweeper (the record's objective), or None: train the job. A folder without a run of its own
    gets a ``summary.json`` saying so, which the sweep table and moa-report show as "recorded"."""
    folder = cfg.get("skip_recorded")
    if not folder:
        return None
    from moa_train.report.leaderboard import RECORDED, record_path, recorded  # deferred: only sweeps that ask

    folder = Path(str(folder))
    if not folder.is_absolute():
        folder = Path(hydra_cfg.runtime.cwd) / folder
    if not folder.is_dir():  # no record yet (a board's first run) or a misspelt folder: say which
        log.warning("skip_recorded=%s is not a folder: this job is trained (no record to skip it by)", folder)
        return None
    name = (
        str(run_dir.relative_to(hydra_cfg.sweep.dir))
        if run_dir.is_relative_to(hydra_cfg.sweep.dir)
        else run_dir.name
    )
    record = recorded(folder, name, cfg)
    if record is None:
        return None
    where = record_path(folder, name)
    log.info("%s: recorded in %s, not trained again (skip_recorded=null trains it)", run_dir, where)
    summary = {"status": RECORDED, "reason": f"recorded in {where}, not trained again"}
    if record.get("objective") and record.get("val_loss") is not None:
        summary[str(record["objective"])] = record["val_loss"]
    if not (run_dir / rundir.CONFIG_NAME).exists():  # never over a run of this folder's own
        rundir.write_summary(run_dir, summary)
    return summary


def busy_job(cfg: DictConfig, hydra_cfg: Any, exc: rundir.RunBusy) -> dict[str, Any]:
    """A job whose folder another process is training: skipped, its folder untouched. An Optuna trial
    has no value to report then, so there it fails (the study records it as failed)."""
    target = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    if target.startswith(OPTUNA_SWEEPER):
        raise exc
    log.warning("%s; skipped here", exc)
    return {"status": "busy", "reason": one_line(exc)}


_STOPPED: list[str] = []  # the stop message of a job of this process that a signal stopped


class SweepStopped(Preempted):
    """A sweep job not started because a signal stopped an earlier job of its process."""

    def hint(self) -> str:
        return str(self)  # nothing ran here: no run to resume, the sweep command continues it


def note_stopped(exc: Preempted) -> None:
    """Remember that a signal stopped a job of this process (see :func:`refuse_if_stopped`)."""
    _STOPPED.append(str(exc))


def refuse_if_stopped(run_dir: Path) -> None:
    """Where a sweep's jobs run in one process (the basic launcher, joblib with n_jobs=1, a reused joblib
    worker), the launcher starts the next job after one stopped on SIGTERM: no signal is pending then, so
    it would train until signalled again. A stopped sweep starts no more jobs; running it again continues."""
    if _STOPPED:
        raise SweepStopped(
            f"not started: this sweep was stopped ({_STOPPED[0]}); run the same sweep again to continue",
            run_dir,
        )


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Leave the reason of a failed job in its folder (never raises)."""
    if isinstance(exc, Preempted | ForeignRun | rundir.RunBusy):
        return  # preempted: summary.json says so; foreign or busy: another run's folder, left untouched
    try:
        if run_dir.is_dir():
            write_atomic(run_dir / ERROR_NAME, f"error: {one_line(exc)} ({type(exc).__name__})\n")
    except OSError:
        pass


def in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ


def requeue_if_submitit(exc: Preempted) -> None:
    """Under submitit, a job stopped by a signal (checkpoint saved) asks submitit to requeue it: its own
    SIGUSR2 handler checkpoints the job's arguments, requeues it and exits; elsewhere this returns."""
    if not in_submitit_job():
        return
    # deferred: optional dependency, present only under the submitit launcher
    from submitit import JobEnvironment

    sig = JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    if not callable(handler):  # not inside submitit's job process after all
        return
    log.warning("%s; asking submitit to requeue the job", exc)
    signal.raise_signal(sig)  # submitit requeues and exits here


def _changed_keys(saved: str, current: str) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key whose value differs. A key only one side has
    counts only when it is switched on (not null, false, 0 or empty): a newer moa_train may add
    options, off by default, between the sessions of a long sweep, and the run continues exactly."""

    try:
        before, now = rundir.flatten(yaml.safe_load(saved)), rundir.flatten(yaml.safe_load(current))
    except yaml.YAMLError as exc:
        raise MoATrainError(
            f"a job folder's config.yaml is not YAML ({exc}); remove the folder to run the job again"
        ) from None
    off = (None, False, 0, "", [], {})
    changed = []
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key), now.get(key)
        if (
            key.split(".")[0] in rundir.NOT_THE_JOB
            or old == new
            or (key not in before and new in off)
            or (key not in now and old in off)
        ):
            continue
        changed.append((key, old if key in before else "<unset>", new if key in now else "<unset>"))
    return changed
