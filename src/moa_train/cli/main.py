"""Command-line entry points ``moa-train`` and ``moa-eval``: compose the config with Hydra, then call.

The configs ship inside the package as ``moa_train.configs`` (pyproject maps the top-level
``configs/`` folder there), so they resolve from the console scripts in any working directory.
Users add their own config folders with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.

Errors a user can fix (a bad option, a bad value, a missing file) print one line ``error: ...`` and
exit with status 2; any other exception prints one line ``error: <what> (<type>); set
HYDRA_FULL_ERROR=1 for the traceback`` and exits with status 1. The whole traceback is printed only
with ``HYDRA_FULL_ERROR=1``, a ``debug=...`` option or ``full_traceback=true``.

A single run writes nothing before its config is validated: Hydra's own files (``.hydra/``) and the
log file are written by the job itself once the run dir is claimed (``moa_train.rundir``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import moa_train.cli.help  # noqa: F401  (registers the resolver of the --help templates)
from moa_train import rundir
from moa_train.cli.keys import check_keys, override_error
from moa_train.cli.sweep_checks import LaunchRefused
from moa_train.errors import MoATrainError, one_line, report

USER_ERRORS = (MoATrainError, HydraException, OmegaConfBaseException)
__all__ = ["eval_main", "one_line", "train_main"]


def _run_dir(resume: str | None, default: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder, a new one gets ``default``."""
    if not resume:
        rundir.note_planned(default)  # Hydra creates it before the job: removed again if left empty
        return default
    return str(rundir.resolve_resume(resume).run_dir)


def _output_subdir(mode: Any) -> str | None:
    """Hydra's ``.hydra/`` files: a single run writes them itself after validation; a sweep job's
    folder is new and numbered, so Hydra writes them there (the sweep summary reads them)."""
    return ".hydra" if str(mode).endswith("MULTIRUN") else None


def _fail(message: str) -> None:
    """``${moa_fail:'<problem>; <fix>'}``: a preset that cannot run yet stops with that one line when
    the value is needed (the chosen-rates block of sweep=leaderboard_seeds before any search finished)."""
    raise MoATrainError(message)


OmegaConf.register_new_resolver("moa_run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("moa_fail", _fail, replace=True)
OmegaConf.register_new_resolver("moa_output_subdir", _output_subdir, replace=True)


@hydra.main(version_base="1.3", config_path="pkg://moa_train.configs", config_name="train")
def _train(cfg: DictConfig) -> Any:
    from moa_train.cli.job import run  # lazy: torch and transformers load after the config composes

    return _job(run, cfg)


@hydra.main(version_base="1.3", config_path="pkg://moa_train.configs", config_name="eval")
def _eval(cfg: DictConfig) -> Any:
    def body(cfg: DictConfig) -> Any:
        # deferred: cli.validate (~8 ms) is not needed by --help; moa_train.eval loads torch, so it comes
        # only after the config validated (a bad value fails in about a second)
        from moa_train.cli.validate import validate

        validate(cfg, "eval")  # every value, before a checkpoint or model is read
        from moa_train.eval import run_from_config  # deferred: loads torch (see above)

        return run_from_config(cfg)

    return _job(body, cfg)


@hydra.main(version_base="1.3", config_path="pkg://moa_train.configs", config_name="export")
def _export(cfg: DictConfig) -> Any:
    def body(cfg: DictConfig) -> Any:
        # deferred: cli.validate (~8 ms) is not needed by --help; cli.export loads torch, so it comes
        # only after the config validated (a bad value fails in about a second)
        from moa_train.cli.validate import validate

        validate(cfg, "export")  # every key and value, before the checkpoint or the model is read
        from moa_train.cli.export import run_from_config  # deferred: loads torch (see above)

        return run_from_config(cfg)

    return _job(body, cfg)


def _job(body: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a job body. A single run reports its error here, before Hydra adds its own line about the
    failed job; in a sweep the error goes back to Hydra so that the other jobs still run. Every command's
    keys are checked first (``+key=value`` adds keys Hydra does not refuse; cli/keys.py)."""
    try:
        check_keys(cfg, HydraConfig.get().job.config_name)
        return body(cfg)
    except (Exception, KeyboardInterrupt) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN or _FULL_TRACEBACK:
            raise
        rundir.remove_unused_planned()
        report(exc, USER_ERRORS, full=False)


def train_main() -> None:
    """``moa-train``: fine-tune (with no overrides: the quickstart)."""
    _guarded(_train, "train")


def eval_main() -> None:
    """``moa-eval``: evaluate a base model or a checkpoint."""
    _guarded(_eval, "eval")


def export_main(argv: list[str] | None = None) -> None:
    """``moa-export``: a plain-LoRA checkpoint as a PEFT adapter or a merged model (Hydra key=value
    overrides, configs/export.yaml, checked as moa-train's are). ``argv`` replaces the command line (for
    tests and scripts)."""
    if argv is None:
        _guarded(_export, "export")
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "moa-export", *argv]
    try:
        _guarded(_export, "export")
    finally:
        sys.argv = saved


def _wants_traceback(argv: list[str]) -> bool:
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
        return True
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "debug" and value not in ("", "null"):
            return True
        if key == "full_traceback" and value.lower() in ("true", "1", "yes"):
            return True
    return False


_FULL_TRACEBACK = False  # decided once per invocation, before HYDRA_FULL_ERROR is set below


def _guarded(entry: Callable[[], Any], root: str) -> None:
    global _FULL_TRACEBACK
    full = _FULL_TRACEBACK = _wants_traceback(sys.argv[1:])
    previous = os.environ.get("HYDRA_FULL_ERROR")
    rundir.forget_planned()
    for arg in sys.argv[1:]:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and not key.strip():
            report(MoATrainError(f"argument {arg!r} has no key; write key=value, e.g. trainer.max_steps=3"))
        if key == "hydra.run.dir" and value:  # an explicit run dir that Hydra creates before the job runs
            try:
                rundir.note_planned(value)
            except MoATrainError as exc:
                report(exc)
    # Hydra prints errors itself and exits 1 unless HYDRA_FULL_ERROR is set; setting it makes the
    # exception reach us, so every entry point reports errors the same way (one line).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except SystemExit:
        raise
    except LaunchRefused as refused:  # a sweep's launcher or sweeper settings, before it started
        report(refused.error, USER_ERRORS, full=full)
    except (Exception, KeyboardInterrupt) as exc:
        rundir.remove_unused_planned()
        # a refused override (a key the config lacks, a value of the wrong type): name it and the fix
        report(override_error(exc, root) or exc, USER_ERRORS, full=full)
    finally:
        rundir.remove_unused_planned()
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
