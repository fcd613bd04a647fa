"""Run folders: planned from the config, claimed atomically after validation, never reused by accident.

A new run's folder is claimed by creating its ``config.yaml`` with ``os.link`` (which fails when the
file exists), so two runs started in the same second, or on several machines sharing a file system,
never share a folder: the default ``runs/<name>/<timestamp>`` gets a ``-2``, ``-3``... suffix, and an
explicit ``hydra.run.dir`` that already holds a run is refused unless ``resume=`` or ``overwrite=true``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from moa_train.errors import MoATrainError

CONFIG_NAME = "config.yaml"
# Files and folders that only a run writes: a folder holding any of them holds a run.
RUN_MARKERS = (CONFIG_NAME, "checkpoints", "final", "summary.json", "metrics.jsonl", "train.log", ".hydra")

# Folders Hydra may create for this invocation before the job validates: (run dir, first new ancestor).
_PLANNED: list[tuple[Path, Path]] = []


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


def write_new(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if it does not exist (atomic: complete or absent); False if taken."""
    with _synced_temp(path, text) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a unique temp file renamed over it)."""
    with _synced_temp(path, text) as tmp:
        os.replace(tmp, path)


@contextlib.contextmanager
def _synced_temp(path: Path, text: str) -> Iterator[Path]:
    """A temp file beside ``path`` (unique per process and call) holding ``text`` on disk; removed after."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _clear(path: Path) -> None:
    """``overwrite=true``: delete what the earlier run left in ``path``."""
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
