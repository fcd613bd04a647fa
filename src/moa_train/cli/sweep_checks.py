"""Check a sweep's launcher and sweeper settings before anything is launched or written.

Hydra's plugins check their own settings late and in their own words: ``hydra.launcher.n_jobs=0``
fails inside joblib after the sweep folder exists ("n_jobs == 0 in Parallel has no meaning"), a
negative ``timeout_min`` makes every submitit job die without output, ``hydra/launcher=slurm`` off a
cluster says "Could not detect srun", a mistyped Optuna ``storage`` says "Can't load plugin:
sqlalchemy.dialects:foo". :class:`LaunchCheck` (a Hydra callback, configs/hydra/default.yaml) runs
when the multirun starts, before the sweeper or launcher is created, and refuses such a sweep with one
line that names the key and the fix.

Hydra turns errors raised by callbacks into warnings, so the refusal travels as :class:`LaunchRefused`,
a ``BaseException`` that Hydra lets through; the console script reports the error it carries
(``moa_train.cli.main``) with exit status 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from moa_train.errors import MoATrainError

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher"
SUBMITIT_LAUNCHER = "hydra_plugins.hydra_submitit_launcher"

# submitit keys: (smallest value, may be null). hydra/launcher=slurm documents each (configs/hydra/launcher).
_SUBMITIT_MINIMUM = {
    "timeout_min": (1, False),
    "nodes": (1, False),
    "tasks_per_node": (1, False),
    "gpus_per_node": (0, True),
    "cpus_per_task": (1, True),
    "mem_gb": (1, True),
    "signal_delay_s": (0, True),
    "max_num_timeout": (0, True),
    "array_parallelism": (1, True),
}


class LaunchRefused(BaseException):
    """Carries the :class:`MoATrainError` of a refused sweep past Hydra's callback error handling."""

    def __init__(self, error: MoATrainError) -> None:
        super().__init__(str(error))
        self.error = error


class LaunchCheck(Callback):
    """Refuses a multirun whose launcher or sweeper settings cannot work, before it starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_launch(config)
        except MoATrainError as exc:
            raise LaunchRefused(exc) from None


def check_launch(config: DictConfig) -> None:
    """Raise one :class:`MoATrainError` for the first launcher or sweeper setting that cannot work."""
    hydra_cfg = config.hydra
    sweeper = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if sweeper.startswith(OPTUNA_SWEEPER):
        _check_optuna(config, hydra_cfg.sweeper)
    if launcher.startswith(JOBLIB_LAUNCHER):
        _check_joblib(hydra_cfg.launcher)
    elif launcher.startswith(SUBMITIT_LAUNCHER):
        _check_submitit(hydra_cfg.launcher, slurm=launcher.endswith("SlurmLauncher"))
    # a folder name that resolves only later (a user's own interpolation) is Hydra's to make and report
    _check_sweep_dir(
        OmegaConf.select(hydra_cfg, "sweep.dir", default=None, throw_on_resolution_failure=False)
    )


def _check_sweep_dir(sweep_dir: Any) -> None:
    """The sweep folder can be created: made and removed again here (Hydra makes it right after), so
    that a path under a file, a read-only or a virtual file system is one line, not a traceback."""
    if not sweep_dir:
        return
    path = Path(str(sweep_dir))
    made = []
    try:
        for folder in (*reversed(path.parents), path):
            if folder.is_dir():
                continue
            if folder.exists():
                raise NotADirectoryError(f"{folder} is a file")
            try:
                folder.mkdir()
                made.append(folder)
            except FileExistsError:  # a sweep starting in the same second made it: fine if a folder
                if not folder.is_dir():
                    raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MoATrainError(
            f"hydra.sweep.dir={sweep_dir} cannot be created ({reason}); "
            "choose a folder you can write, e.g. hydra.sweep.dir=multirun/my_sweep"
        ) from None
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # another sweep writes there now: it is theirs to keep
                break


def _int(node: DictConfig, key: str, prefix: str) -> Any:
    value = node.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise MoATrainError(f"{prefix}.{key}={value!r} is invalid: expected an integer")
    return value


def _check_optuna(config: DictConfig, sweeper: DictConfig) -> None:
    prefix = "hydra.sweeper"
    if "objective" not in config:  # moa-eval (or moa-export): its jobs return no number to optimise
        raise MoATrainError(
            f"hydra/sweeper=optuna searches training settings and {config.hydra.job.name} jobs return no objective; "
            "sweep evaluations with the basic sweeper (-m key=a,b), or search with moa-train -m sweep=lr_search"
        )
    if not config.get("objective"):
        raise MoATrainError(
            "hydra/sweeper=optuna needs objective=<a summary.json key to minimise or maximise>, "
            "e.g. objective=val/loss (or use sweep=lr_search, which sets it)"
        )
    if config.get("dry_run"):
        raise MoATrainError(
            "dry_run=true cannot be swept with hydra/sweeper=optuna: a dry run trains nothing, so no trial has "
            "an objective to minimise or maximise; drop dry_run=true (or check the jobs with the basic sweeper)"
        )
    direction = sweeper.get("direction")
    name = str(getattr(direction, "name", direction))  # the plugin's Direction enum or a string
    if name not in ("minimize", "maximize"):
        raise MoATrainError(
            f"{prefix}.direction={name!r} is invalid: moa-train's objective is one number, so the direction "
            "is minimize (lower is better, e.g. val/loss) or maximize (e.g. tuned_accuracy)"
        )
    for key in ("n_trials", "n_jobs"):
        value = _int(sweeper, key, prefix)
        if value is not None and value < 1:
            raise MoATrainError(f"{prefix}.{key}={value} is invalid: expected an integer >= 1")
    storage = sweeper.get("storage")
    if storage is not None:
        _check_storage(str(storage))
    _check_search_space(config, sweeper)


def _check_search_space(config: DictConfig, sweeper: DictConfig) -> None:
    """Each parameter through the plugin's own conversion to an Optuna distribution, one at a time so
    that the error names the key (a log interval from 0, a range the other way round)."""
    # deferred: the plugin is imported only when its sweeper is chosen
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    for entry in [*params, *map(str, task)]:
        try:
            create_params_from_overrides([entry])
        except (ValueError, TypeError, NotImplementedError) as exc:
            key = entry.split("=", 1)[0]
            raise MoATrainError(
                f"the Optuna search space {entry!r} cannot be used ({' '.join(str(exc).split())}); "
                f"give {key} one of interval(a, b) or tag(log, interval(a, b)) with 0 < a < b, range(a, b) "
                "with a < b, or choice(x, y, ...)"
            ) from None


def _check_storage(storage: str) -> None:
    # deferred: sqlalchemy comes with optuna, installed with the sweeper plugin
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    fix = "use sqlite:///<file>.db (a file that keeps the study) or null (in memory, this call only)"
    try:
        url = make_url(storage)
        url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise MoATrainError(f"hydra.sweeper.storage={storage!r} is not a database URL; {fix}") from None
    except ImportError as exc:  # a known database whose driver is not installed (e.g. postgresql)
        raise MoATrainError(
            f"hydra.sweeper.storage={storage!r} needs a driver that is not installed ({exc}); "
            f"install it, or {fix}"
        ) from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).parent
        if not folder.is_dir():
            raise MoATrainError(
                f"hydra.sweeper.storage={storage!r}: the folder {folder} does not exist; create it "
                f"(mkdir -p {folder}) or point the URL at an existing folder"
            )


def _check_joblib(launcher: DictConfig) -> None:
    value = _int(launcher, "n_jobs", "hydra.launcher")
    if value == 0:
        raise MoATrainError(
            "hydra.launcher.n_jobs=0 is invalid: the number of jobs run at once is >= 1 (or -1 for one per core)"
        )
    # Hydra's joblib launcher always runs the jobs with joblib's loky backend (one process per job: each
    # has its own random state and signal handlers); a backend set here would be silently ignored.
    backend, prefer, require = (launcher.get(k) for k in ("backend", "prefer", "require"))
    if backend not in (None, "loky"):
        raise MoATrainError(
            f"hydra.launcher.backend={backend!r} would be ignored: the joblib launcher always runs one process "
            "per job (joblib's loky backend); drop the override (hydra.launcher.backend=null)"
        )
    if prefer not in (None, "processes", "threads"):
        raise MoATrainError(
            f"hydra.launcher.prefer={prefer!r} is invalid: expected processes, threads or null"
        )
    if require is not None:  # joblib: "Backend loky does not support shared memory", after the folder exists
        raise MoATrainError(
            f"hydra.launcher.require={require!r} cannot be met: the joblib launcher runs one process per job, "
            "which share no memory; drop the override (hydra.launcher.require=null)"
        )


def _check_submitit(launcher: DictConfig, slurm: bool) -> None:
    for key, (minimum, nullable) in _SUBMITIT_MINIMUM.items():
        if key not in launcher:
            continue
        value = _int(launcher, key, "hydra.launcher")
        if value is None and not nullable:
            raise MoATrainError(f"hydra.launcher.{key} must be set: expected an integer >= {minimum}")
        if value is not None and value < minimum:
            raise MoATrainError(f"hydra.launcher.{key}={value} is invalid: expected an integer >= {minimum}")
    if slurm and shutil.which("sbatch") is None:
        raise MoATrainError(
            "hydra/launcher=slurm (submitit_slurm) submits SLURM jobs, and sbatch is not on PATH here: run "
            "the command on the cluster's login node, or run the same sweep on this machine with "
            "hydra/launcher=submitit_local or hydra/launcher=joblib"
        )
