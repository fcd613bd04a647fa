"""Command-line entry points ``moa-train`` and ``moa-eval``: compose the config with Hydra, then call.

The configs ship inside the package as ``moa_train.configs`` (pyproject maps the top-level
``configs/`` folder there), so they resolve from the console scripts in any working directory.
Users add their own config folders with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.

Errors a user can fix (a bad option, a bad value, a missing file) print one line ``error: ...`` and
exit with status 2; the whole traceback is printed only with ``HYDRA_FULL_ERROR=1``, a ``debug=...``
option or ``full_traceback=true``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moa_train.errors import MoATrainError

USER_ERRORS = (MoATrainError, HydraException, OmegaConfBaseException)


def _run_dir(resume: str | None, default: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder, a new one gets ``default``."""
    if not resume:
        return default
    from moa_train.checkpoint import resolve_resume  # lazy: only a resumed run needs it (and torch)

    return str(resolve_resume(resume).run_dir)


def _output_subdir(resume: str | None) -> str:
    """Hydra's own files for a resumed invocation go beside the first ones, not over them."""
    if not resume:
        return ".hydra"
    from datetime import datetime

    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}"


OmegaConf.register_new_resolver("moa_run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("moa_output_subdir", _output_subdir, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _train(cfg: DictConfig) -> Any:
    from moa_train.train import run  # lazy: torch and transformers load after the config composes

    return _job(run, cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def _eval(cfg: DictConfig) -> Any:
    from moa_train.eval import run_from_config

    return _job(run_from_config, cfg)


def _job(body: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a job body. A single run reports a user error here, before Hydra adds its own line about
    the failed job; in a sweep the error goes back to Hydra so that the other jobs still run."""
    try:
        return body(cfg)
    except USER_ERRORS as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN or _FULL_TRACEBACK:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def train_main() -> None:
    """``moa-train``: fine-tune (with no overrides: the quickstart)."""
    _guarded(_train)


def eval_main() -> None:
    """``moa-eval``: evaluate a base model or a checkpoint."""
    _guarded(_eval)


def one_line(exc: BaseException) -> str:
    """Fold a multi-line message into one line; a line ending in ':' introduces a comma list.

    Hydra's "Could not find 'router/x'" message lists the available options one per line; they
    come out as "...; Available options in 'router': adamole, instance, none".
    """
    cause = exc
    while cause is not None and not isinstance(cause, MoATrainError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # e.g. raised inside a resolver: OmegaConf wraps it with its own context
        exc = cause
    text, in_list = "", False
    for line in (s.strip() for s in str(exc).splitlines()):
        if not line:
            continue
        if in_list and not line.endswith(":"):
            text += ", " + line if not text.endswith(":") else " " + line
        else:
            text += ("; " if text else "") + line
            in_list = line.endswith(":")
    return text or type(exc).__name__


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


def _guarded(entry: Callable[[], Any]) -> None:
    global _FULL_TRACEBACK
    full = _FULL_TRACEBACK = _wants_traceback(sys.argv[1:])
    previous = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra prints errors itself and exits 1 unless HYDRA_FULL_ERROR is set; setting it makes the
    # exception reach us, so every entry point reports errors the same way (one line, status 2).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except USER_ERRORS as exc:
        if full:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
