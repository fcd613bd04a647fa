"""User-facing errors: the one exception type for fixable mistakes, and the console scripts' last line
of defence that turns any escaping exception into one ``error: ...`` line."""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

TRACEBACK_HINT = "set HYDRA_FULL_ERROR=1 for the traceback"
EXIT_USER_ERROR = 2  # a MoATrainError, a bad option or value
EXIT_INTERNAL_ERROR = 1  # any other exception
EXIT_INTERRUPTED = 130  # Ctrl-C outside the training loop
EXIT_PREEMPTED = 75  # a signal stopped training after saving a checkpoint (EX_TEMPFAIL: resume later)


class MoATrainError(ValueError):
    """A problem the user can fix. Its message is one line that names the problem and the fix.

    The command-line entry points print it as ``error: <message>`` and exit with status 2; the full
    traceback is shown only with ``HYDRA_FULL_ERROR=1``.
    """


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint: the run can be resumed."""

    def __init__(self, message: str, run_dir: Any) -> None:
        super().__init__(message)
        self.run_dir = run_dir

    def hint(self) -> str:
        return f"{self}; resume with: moa-train resume={self.run_dir}"


def full_traceback_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """Fold a multi-line message into one line; a line ending in ':' introduces a comma list.

    Hydra's "Could not find 'router/x'" message lists the available options one per line; they
    come out as "...; Available options in 'router': adamole, instance, none".
    """
    cause: BaseException | None = exc
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


def report(
    exc: BaseException,
    user_errors: tuple[type[BaseException], ...] = (MoATrainError,),
    full: bool | None = None,
) -> NoReturn:
    """Print ``exc`` as one ``error:`` line (the traceback before it when requested) and exit."""
    full = full_traceback_requested() if full is None else full
    if full:
        traceback.print_exception(exc)
    sys.stdout.flush()
    if isinstance(exc, Preempted):  # not an error: the run saved its step and can go on
        print(exc.hint(), file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted (KeyboardInterrupt)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(exc, user_errors):
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    hint = "" if full else f"; {TRACEBACK_HINT}"
    print(f"error: {one_line(exc)} ({type(exc).__name__}){hint}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERNAL_ERROR)


def entry_point(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a console script's ``main``: whatever escapes becomes one ``error:`` line and an exit status."""

    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except SystemExit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            report(exc)

    return guarded


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``error: ...; see <prog> --help``)."""

    def error(self, message: str) -> NoReturn:
        # argparse names an unknown flag but not the one meant (--outt -> --out), as the Hydra commands do
        if message.startswith("unrecognized arguments: "):
            flags = {o.lstrip("-"): o for a in self._actions for o in a.option_strings}
            for arg in message.removeprefix("unrecognized arguments: ").split():
                name = arg.partition("=")[0].lstrip("-")
                close = difflib.get_close_matches(name, list(flags), n=1, cutoff=0.75)
                if arg.startswith("-") and close:
                    raise MoATrainError(f"{message}: did you mean {flags[close[0]]}? see {self.prog} --help")
        raise MoATrainError(f"{message}; see {self.prog} --help")
