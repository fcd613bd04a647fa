"""The one home for durable writes and checked reads of the files moa_train keeps on disk.

Every file a run, checkpoint, cache or report writes goes through here, so "complete or absent" means
the same everywhere: text is written to a unique temp file beside the target, fsynced, then renamed
over it (``write_atomic``) or hard-linked to it when it must not exist yet (``write_new``). Reads give
one-line :class:`MoATrainError` messages naming the file (missing, not UTF-8, not JSON, not safetensors).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moa_train.errors import MoATrainError


def cache_root() -> Path:
    """``$MOA_TRAIN_CACHE`` or ``~/.cache/moa_train``: converted models, downloads, prepared data."""
    return Path(os.environ.get("MOA_TRAIN_CACHE") or Path.home() / ".cache" / "moa_train").expanduser()


def config_dir() -> Path:
    """The directory holding the packaged Hydra configs (``moa_train.configs``, else the source tree).

    Torch-free on purpose: ``moa-train --help`` lists the config choices from here."""
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        # deferred: importlib.resources costs ~5 ms; moa-report and moa-bench import this module too
        import importlib.resources

        found = Path(str(importlib.resources.files("moa_train.configs")))
        if (found / "decoding").is_dir():
            return found
    return Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


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
def atomic_path(path: Path) -> Iterator[Path]:
    """For writers that need a file name (safetensors, matplotlib): a unique temp path beside ``path``,
    flushed to disk and renamed over ``path`` when the block succeeds, removed when it fails."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_synced(path: Path, data: Any) -> None:
    """``data`` as indented JSON, flushed to disk; for files inside a folder that is itself renamed into
    place when complete (a checkpoint), where a per-file rename would add nothing."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: Path, keep_theirs: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; rename it to ``target`` (absent or empty) when the block succeeds.

    If another process completed ``target`` first, its copy is kept and ours is discarded (a cache:
    both are the same), or with ``keep_theirs=False`` the rename's error is raised (ours is discarded).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        _share_like_umask(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not keep_theirs or not target.is_dir() or not any(target.iterdir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _share_like_umask(directory: Path) -> None:
    """mkdtemp creates 0700 dirs (and some writers 0600 files): give the output the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


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


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_json(path: Path, kind: type | None = None) -> Any:
    """A JSON file of a checkpoint or run, with one-line errors naming it; ``kind``: the expected top level."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoATrainError(f"{path} is missing; the checkpoint is incomplete") from None
    except UnicodeDecodeError:
        raise MoATrainError(f"{path} is not UTF-8 text; the checkpoint is damaged") from None
    except json.JSONDecodeError as exc:
        raise MoATrainError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    except OSError as exc:
        raise MoATrainError(f"{path} cannot be read ({exc.strerror})") from None
    if kind is not None and not isinstance(data, kind):
        raise MoATrainError(
            f"{path} holds a JSON {type(data).__name__}, expected {kind.__name__}; the checkpoint is damaged"
        )
    return data


def read_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file, with one-line errors naming it (missing, truncated, not safetensors)."""
    # deferred: torch/safetensors are heavy and `moa_train.files` is imported by the fast CLI start-up
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MoATrainError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError or OSError: truncated, garbage, unreadable
        reason = " ".join(str(exc).split())[:160]
        raise MoATrainError(
            f"{path} is not a readable safetensors file ({reason}); the checkpoint is damaged"
        ) from None
