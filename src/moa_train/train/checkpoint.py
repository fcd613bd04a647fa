"""Checkpoints: atomic directories with the adapters and everything needed to resume exactly.

Layout of ``<run dir>/checkpoints/step-<N>/`` (and ``<run dir>/final/``):

    adapter_config.json, adapter_model.safetensors   model.save_pretrained (+ the "model" config node)
    optimizer.safetensors + optimizer.json           AdamW moments / param groups
    scheduler.json, scaler.json                      LR schedule position, fp16 loss-scale state
    rng-rank<r>.safetensors + rng-rank<r>.json       torch (CPU/CUDA), Python and NumPy RNG per process
    trainer_state.json                               step, epoch, position in the epoch, counters

Tensors go to safetensors and everything else to JSON: no pickles, so a checkpoint can be inspected
and loaded without executing code. A directory is written under a temporary name and renamed when
complete, so a run killed mid-save leaves the previous checkpoints intact and no half directory
that looks finished. Only the last ``keep_last`` step checkpoints are kept.
"""

from __future__ import annotations

import errno
import os
import random
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError
from safetensors.torch import save_file

from moa_train.core.dist import full_tensor, gathered_adapters, shard_like_params
from moa_train.core.model import WEIGHTS_NAME
from moa_train.errors import MoATrainError
from moa_train.files import fsync_dir, read_json, read_tensors, write_json_synced
from moa_train.rundir import STATE_NAME, STEP_DIR, latest_checkpoint, step_checkpoints

TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Where training stands; restored on resume so the run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch (the data position)
    tokens_seen: int = 0  # non-padding input tokens processed, all processes
    train_seconds: float = 0.0  # wall time spent in the training loop, all sessions
    world_size: int = 1
    wandb_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(
    target: Path,
    *,
    accelerator: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    state: TrainState,
    extra_config: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``target`` atomically from every process (each adds its RNG state); prune old ones.

    ``model`` is the unwrapped MoAModel. Call on all processes: it synchronises them.
    """
    rank, main = accelerator.process_index, accelerator.is_main_process
    # a temp name unique to this process and save (rank 0 picks it, the other ranks receive it)
    names = [f"{TMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}" if main else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(names)
    tmp = target.parent / names[0]
    # An OSError (full disk, quota, read-only) is caught per phase and shared with every rank, so all
    # ranks stop together; the collectives (FSDP gathers) run on every rank whatever happened.
    failed = _attempt(lambda: (_remove_leftovers(target.parent), tmp.mkdir(parents=True)) if main else None)
    failed = _agree(accelerator, failed)
    if failed is None:
        rng_tensors, rng_json = rng_state()
        failed = _attempt(
            lambda: (
                save_file(rng_tensors, str(tmp / f"rng-rank{rank}.safetensors")),
                write_json_synced(tmp / f"rng-rank{rank}.json", rng_json),
            )
        )
        tensors, meta = optimizer_state(optimizer, model)  # every rank: under FSDP this gathers the shards
        with gathered_adapters(model):  # FSDP: every rank takes part; the file is the one 1 process writes
            if main and failed is None:
                failed = _attempt(lambda: model.save_pretrained(tmp, extra_config=extra_config))
        if main and failed is None:
            failed = _attempt(
                lambda: (
                    save_file(tensors, str(tmp / "optimizer.safetensors")),
                    write_json_synced(tmp / "optimizer.json", meta),
                    write_json_synced(tmp / "scheduler.json", scheduler.state_dict()),
                    write_json_synced(tmp / "scaler.json", scaler.state_dict() if scaler is not None else {}),
                )
            )
        failed = _agree(accelerator, failed)  # every rank's RNG file is in place, or every rank stops
    if failed is None and main:  # written last: marks a complete directory
        failed = _attempt(lambda: (write_json_synced(tmp / STATE_NAME, asdict(state)), fsync_dir(tmp)))
    failed = _agree(accelerator, failed)
    if failed is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(target.parent.parent) if target.parent.name == "checkpoints" else None
        raise MoATrainError(
            f"could not write checkpoint {target}: {_reason(failed)}; the temporary folder was removed"
            + (f" and the previous checkpoint {kept} is kept" if kept else "")
            + "; free space (or move the run), then resume"
        ) from failed
    if main:
        stale = target.parent / f"{TMP_PREFIX}old-{names[0][len(TMP_PREFIX) :]}"
        if target.exists():  # e.g. final/ of an earlier session of a resumed run
            os.rename(target, stale)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(stale, ignore_errors=True)
        if keep_last:
            for old in step_checkpoints(target.parent.parent)[:-keep_last]:
                prune(old)
        for stale_step in _incomplete_steps(target.parent, keep=target):  # a prune a kill interrupted
            prune(stale_step)
    accelerator.wait_for_everyone()
    return target


def prune(checkpoint: Path) -> None:
    """Delete a checkpoint so that no kill can leave it looking complete: first its completeness
    marker, then an atomic rename out of the ``step-<N>`` name, then the files."""
    (checkpoint / STATE_NAME).unlink(missing_ok=True)
    fsync_dir(checkpoint)
    gone = checkpoint.parent / f"{TMP_PREFIX}del-{checkpoint.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _incomplete_steps(folder: Path, keep: Path) -> list[Path]:
    if folder.name != "checkpoints":
        return []
    return [
        p for p in folder.iterdir() if STEP_DIR.match(p.name) and p != keep and not (p / STATE_NAME).is_file()
    ]


def _remove_leftovers(folder: Path) -> None:
    """Temporary folders of saves or prunings that a kill interrupted (never a complete checkpoint)."""
    if folder.is_dir():
        for leftover in folder.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _attempt(write: Any) -> OSError | None:
    """Run ``write``; a failed write (full disk, quota, read-only) comes back as an OSError."""
    try:
        write()
    except OSError as exc:
        return exc
    except SafetensorError as exc:  # safetensors reports I/O errors as "... (os error 28)"
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def _agree(accelerator: Any, failed: OSError | None) -> OSError | None:
    """Every rank learns whether any rank failed, so that none waits forever for the others."""
    if accelerator.num_processes == 1:
        return failed

    mine = None if failed is None else (failed.errno, failed.strerror, failed.filename)
    errors = [e for e in gather_object([mine]) if e]
    if failed is None and errors:
        failed = OSError(*errors[0])
    return failed


def _reason(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}" + (f" [{code}]" if code else "")


def optimizer_state(optimizer: torch.optim.Optimizer, model: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON (groups, parameter names)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = full_tensor(value).detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    meta = {
        "param_groups": sd["param_groups"],
        "param_names": [names.get(id(p), "?") for p in ordered],  # checked on load
        "scalars": scalars,
    }
    return tensors, meta


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: Path,
    *,
    accelerator: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
) -> TrainState:
    """Restore adapters, optimizer, scheduler, scaler and this process's RNG; return the state."""
    state = read_train_state(path / STATE_NAME)
    if state.world_size != accelerator.num_processes:
        raise MoATrainError(
            f"{path} was written by {state.world_size} process(es) but this run has "
            f"{accelerator.num_processes}; resume with launcher.num_processes={state.world_size}"
        )
    rank = accelerator.process_index
    # every file is read and checked before anything is restored
    weights = read_tensors(path / WEIGHTS_NAME)
    meta = read_json(path / "optimizer.json", dict)
    tensors = read_tensors(path / "optimizer.safetensors")
    scheduler_state = read_json(path / "scheduler.json", dict)
    scaler_state = read_json(path / "scaler.json", dict)
    rng_tensors = read_tensors(path / f"rng-rank{rank}.safetensors")
    rng_json = read_json(path / f"rng-rank{rank}.json", dict)
    model.load_adapter_weights(weights, source=str(path / WEIGHTS_NAME))
    here = [n for n, _ in _named_in_order(optimizer, model)]
    if meta.get("param_names") != here:
        raise MoATrainError(f"{path}: the optimizer state belongs to other trainable parameters")
    try:  # a structure that does not fit is a damaged checkpoint, named in one line
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        for index, values in meta["scalars"].items():
            per_param.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict(
            {"state": shard_like_params(optimizer, per_param), "param_groups": meta["param_groups"]}
        )
        scheduler.load_state_dict(scheduler_state)
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        set_rng_state(rng_tensors, rng_json)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
        raise MoATrainError(
            f"{path}: the optimizer, scheduler or RNG state is damaged ({' '.join(str(exc).split())[:160]})"
        ) from None
    return state


def read_train_state(path: Path) -> TrainState:
    """``trainer_state.json``, checked: known keys only, non-negative counts."""
    data = read_json(path, dict)
    unknown = sorted(set(data) - {f.name for f in fields(TrainState)})
    if unknown:
        raise MoATrainError(
            f"{path}: unknown key(s) {unknown}; the checkpoint is damaged or from another tool"
        )
    state = TrainState(**data)
    for name in ("step", "epoch", "step_in_epoch", "tokens_seen", "world_size"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MoATrainError(f"{path}: {name}={value!r} is not a count; the checkpoint is damaged")
    if not isinstance(state.extra, dict):
        raise MoATrainError(f"{path}: extra is not an object; the checkpoint is damaged")
    return state


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _named_in_order(optimizer: torch.optim.Optimizer, model: Any) -> list[tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names.get(id(p), "?"), p) for g in optimizer.param_groups for p in g["params"]]
