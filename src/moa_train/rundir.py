"""Run folders: the one module that knows their layout (names, claiming, ``summary.json``, finding the
newest complete checkpoint, refusing code from saved files). Train, resume, eval, report and export use it.

Planned from the config, claimed atomically after validation, never reused by accident.

A new run's folder is claimed by creating its ``config.yaml`` with ``os.link`` (which fails when the
file exists), so two runs started in the same second, or on several machines sharing a file system,
never share a folder: the default ``runs/<name>/<timestamp>`` gets a ``-2``, ``-3``... suffix, and an
explicit ``hydra.run.dir`` that already holds a run is refused unless ``resume=`` or ``overwrite=true``.

While a process trains a run (a new one, a resume, a sweep job, a requeued SLURM job), it holds the
run's lock (:func:`hold`), so a second process never trains, resumes or clears the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from moa_train.errors import MoATrainError
from moa_train.files import write_atomic, write_new

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
LOCK_NAME = "run.lock"  # locked (flock) by the one process training the run; names that process
SUMMARY_NAME = "summary.json"  # what a finished (or stopped) run reports
STATE_NAME = "trainer_state.json"  # written last into a checkpoint folder: marks it complete
ADAPTER_CONFIG = "adapter_config.json"  # a saved adapter (a checkpoint or an exported/copied one)
STEP_DIR = re.compile(r"^step-(\d+)$")
# Top-level keys that say how a job is started or picked, not what it trains: a sweep job's folder
# continues when only these differ (the leaderboard's chosen-rates block grows while its phase 2 runs;
# the rate a job trains with is its optimizer.lr, which counts), and moa-report never splits a method by them.
NOT_THE_JOB = ("resume", "skip_recorded", "leaderboard_methods", "leaderboard_rates")
# Files and folders that only a run writes: a folder holding any of them holds a run.
RUN_MARKERS = (CONFIG_NAME, "checkpoints", "final", SUMMARY_NAME, "metrics.jsonl", "train.log", ".hydra")

# Folders Hydra may create for this invocation before the job validates: (run dir, first new ancestor).
_PLANNED: list[tuple[Path, Path]] = []


def flatten(node: Any) -> dict[str, Any]:
    """A run config (nested mappings, as YAML loads it) as ``{"dotted.key": leaf}``; an empty mapping is
    a leaf. Sweep jobs and moa-report compare run configs key by key through it."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(child, f"{prefix}{key}.")
        elif prefix:
            flat[prefix[:-1]] = value

    walk(node, "")
    return flat


def note_planned(path: str | os.PathLike[str]) -> None:
    """Remember ``path`` if it does not exist yet, so that a failed start can remove it again; refuse a
    run dir that is, or lies under, a file."""
    run_dir = Path(path).absolute()
    for candidate in [run_dir, *run_dir.parents]:
        if candidate.exists() and not candidate.is_dir():
            where = "is" if candidate == run_dir else f"lies under the file {candidate}, which is"
            raise MoATrainError(f"run dir {path} {where} not a folder; choose another hydra.run.dir")
    first_new = None
    for candidate in [run_dir, *run_dir.parents]:
        if candidate.exists():
            break
        first_new = candidate
    if first_new is not None and (run_dir, first_new) not in _PLANNED:
        _PLANNED.append((run_dir, first_new))


def forget_planned() -> None:
    _PLANNED.clear()


def remove_unused_planned() -> None:
    """Remove the folders this invocation created and left empty (a failed or dry start writes nothing)."""
    for run_dir, first_new in _PLANNED:
        path = run_dir
        while True:
            try:
                path.rmdir()  # only when empty
            except OSError:
                break
            if path == first_new:
                break
            path = path.parent
    _PLANNED.clear()


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def claim(run_dir: Path, config_text: str, *, auto: bool, overwrite: bool) -> Path:
    """Create ``run_dir/config.yaml`` exclusively and return the run dir that now belongs to this run.

    ``auto``: the folder was chosen by the config (timestamped), so a taken one moves to the next free
    ``<folder>-<n>``; otherwise a folder holding a run is refused (or emptied first with ``overwrite``).
    """
    base = Path(run_dir)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if holds_run(path):
            if auto:
                continue
            if not overwrite:
                raise MoATrainError(
                    f"{path} already holds a run; continue it with resume={path}, pick another "
                    "hydra.run.dir, or pass overwrite=true to delete it and start over"
                )
            with hold(path):  # a run still training there is refused, not deleted under its process
                _clear(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise MoATrainError(f"run dir {path} is a file; choose another hydra.run.dir") from None
        except NotADirectoryError:
            raise MoATrainError(f"run dir {path} lies under a file; choose another hydra.run.dir") from None
        if write_new(path / CONFIG_NAME, config_text):
            return path
        if not auto:  # another process claimed it between our check and the link
            raise MoATrainError(f"{path} was just claimed by another run; choose another hydra.run.dir")
    raise MoATrainError(f"no free run dir next to {base}; choose hydra.run.dir")


def _clear(path: Path) -> None:
    """``overwrite=true``: delete what the earlier run left in ``path``."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:  # held by this process while it clears: never deleted (see hold)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ----------------------------------------------------------------------------------------------------
# The run's lock: one process trains a run dir at a time
# ----------------------------------------------------------------------------------------------------


class RunBusy(MoATrainError):
    """Another live process holds the run's lock: it is training, resuming or clearing that folder."""


# flock failing with these means the file system has no locks (some Lustre or old NFS mounts)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# hold() retries at least this long: a report probing the lock (holder()) holds it for an instant, and a
# job starting at that instant must not take the run for one in use
PROBE_GRACE_S = 2.0


@contextlib.contextmanager
def hold(run_dir: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` for the block, or raise :class:`RunBusy` naming the process that does.

    ``flock`` rather than a pid file: the kernel (or the NFS lock manager) releases it when its holder
    exits, however it exits (kill -9, preemption, a crashed node), so a stale lock never blocks a
    resume. The file is never deleted: a process that deleted it could let a second one lock a new
    file while a third still holds the old one. The holder writes its pid, host and start time into
    it, only for the message. ``wait_s``: keep trying that long (a requeued SLURM job may start
    while its predecessor is still exiting). On a file system without locks this warns and goes on.
    """
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by launched workers (PEP 446)
    try:
        deadline = time.monotonic() + max(wait_s, PROBE_GRACE_S)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                    raise RunBusy(
                        f"{run_dir} is in use by another process ({holder}); wait for it to end or stop "
                        "it, then run the same command again"
                    ) from None
                time.sleep(min(1.0, PROBE_GRACE_S / 10))
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                log.warning(
                    "%s: this file system has no file locks; nothing stops a second process from "
                    "using this run dir at the same time",
                    run_dir,
                )
                break
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, (holder + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock ("pid N on host since T"), or None when no live process does (the
    run ended, was killed, or never took it). Read-only: never creates the lock file; a shared lock
    taken and dropped at once, which :func:`hold` rides out (``PROBE_GRACE_S``)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
    except OSError:  # a file system without locks: nothing can be told
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# summary.json
# ----------------------------------------------------------------------------------------------------


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json`` ({} while it has none)."""
    path = Path(run_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------
# Checkpoints of a run: which exist, which is newest
# ----------------------------------------------------------------------------------------------------


@dataclass
class ResumeTarget:
    run_dir: Path
    checkpoint: Path | None  # None: a run dir without any complete checkpoint


def resolve_resume(path: str | os.PathLike[str]) -> ResumeTarget:
    """``resume=<run dir | checkpoint dir>`` -> the run dir and the checkpoint to load.

    A run dir resumes from its newest complete checkpoint: ``final/`` of a finished run (to extend it),
    else the highest ``checkpoints/step-<N>/``.
    """
    target = Path(path).expanduser().resolve()
    if (target / STATE_NAME).is_file():  # a checkpoint (step-N or final)
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        if not (run_dir / CONFIG_NAME).is_file():
            raise MoATrainError(
                f"resume={path}: {run_dir} has no {CONFIG_NAME}; pass the run dir it belongs to"
            )
        return ResumeTarget(run_dir, target)
    if (target / CONFIG_NAME).is_file():  # a run dir: its newest complete checkpoint
        final = target / "final"
        if (final / STATE_NAME).is_file():
            return ResumeTarget(target, final)
        return ResumeTarget(target, latest_checkpoint(target))
    raise MoATrainError(
        f"resume={path}: not a run directory (no {CONFIG_NAME}) nor a checkpoint (no {STATE_NAME})"
    )


def step_checkpoints(run_dir: Path, marker: str = STATE_NAME) -> list[Path]:
    """Complete step checkpoints of a run (holding ``marker``), oldest first (temporary dirs never match)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / marker).is_file()  # the marker is written last
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint dir (holds adapter_config.json), or a run dir -> its ``final/`` or newest ``checkpoints/step-N/``."""
    root = Path(path).expanduser()
    if not root.exists():
        raise MoATrainError(f"checkpoint not found: {root}")
    if (root / ADAPTER_CONFIG).is_file():
        return root
    if (root / "final" / ADAPTER_CONFIG).is_file():
        return root / "final"
    steps = step_checkpoints(root, marker=ADAPTER_CONFIG)
    if steps:
        return steps[-1]
    raise MoATrainError(
        f"{root} is not a checkpoint: no {ADAPTER_CONFIG} in it, in final/ or in checkpoints/step-N/"
    )


# ----------------------------------------------------------------------------------------------------
# No code from files
# ----------------------------------------------------------------------------------------------------

CODE_KEYS = ("trust_remote_code",)  # options that make a loader execute code shipped with a model/data


def refuse_code_from_file(from_file: Any, current: Any, source: Any) -> None:
    """Nothing read from a checkpoint or a run dir may turn on code loading.

    Every code-loading option that ``from_file`` (a saved config node) turns on must also be on in
    ``current`` (the node composed from this command line), and a saved node may not name a
    ``_target_`` to instantiate. Raise one MoATrainError naming the file and the key otherwise.
    """
    data = OmegaConf.to_container(from_file, resolve=False) if OmegaConf.is_config(from_file) else from_file
    for path, value in _walk(data):
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "_target_":
            raise MoATrainError(
                f"{source} names code to instantiate ({path}={value!r}); a saved run or checkpoint may not"
            )
        if leaf in CODE_KEYS and value not in (False, None, 0, "false", "False"):
            now = OmegaConf.select(current, path, default=None) if OmegaConf.is_config(current) else None
            if now is not True:
                raise MoATrainError(
                    f"{source} sets {path}={show_value(value)}, but code loading is never enabled from a saved "
                    f"file; if you trust that model's code, add {path}=true to the command line"
                )


def _walk(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _walk(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _walk(value, f"{prefix}[{i}]")
    else:
        yield prefix, data


def show_value(value: Any) -> str:
    """A config value as the user would type it (true/false, quoted strings, plain containers)."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)
