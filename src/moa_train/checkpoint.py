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

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moa_train.errors import MoATrainError
from moa_train.parallel import full_tensor, gathered_adapters, shard_like_params

STATE_NAME = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
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


@dataclass
class ResumeTarget:
    run_dir: Path
    checkpoint: Path | None  # None: a run dir without any complete checkpoint


def resolve_resume(path: str | os.PathLike[str]) -> ResumeTarget:
    """``resume=<run dir | checkpoint dir>`` -> the run dir and the checkpoint to load."""
    target = Path(path).expanduser().resolve()
    if (target / STATE_NAME).is_file():  # a checkpoint (step-N or final)
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        return ResumeTarget(run_dir, target)
    if (target / "config.yaml").is_file():  # a run dir: its newest complete checkpoint
        return ResumeTarget(target, latest_checkpoint(target))
    raise MoATrainError(
        f"resume={path}: not a run directory (no config.yaml) nor a checkpoint (no {STATE_NAME})"
    )


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary dirs never match)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


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
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_tensors, rng_json = rng_state()
    save_file(rng_tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    _write_json(tmp / f"rng-rank{rank}.json", rng_json)
    tensors, meta = optimizer_state(optimizer, model)  # every rank: under FSDP this gathers the shards
    with gathered_adapters(model):  # FSDP: every rank takes part; the file is the one 1 process writes
        if main:
            model.save_pretrained(tmp, extra_config=extra_config)
    if main:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "scaler.json", scaler.state_dict() if scaler is not None else {})
    accelerator.wait_for_everyone()  # every rank's RNG file is in place
    if main:
        _write_json(tmp / STATE_NAME, asdict(state))  # written last: marks a complete directory
        _fsync_dir(tmp)
        stale = target.parent / f"{TMP_PREFIX}old-{target.name}"
        if target.exists():  # e.g. final/ of an earlier session of a resumed run
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(target, stale)
        os.rename(tmp, target)
        shutil.rmtree(stale, ignore_errors=True)
        _fsync_dir(target.parent)
        if keep_last:
            for old in step_checkpoints(target.parent.parent)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


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
    state = TrainState(**read_json(path / STATE_NAME))
    if state.world_size != accelerator.num_processes:
        raise MoATrainError(
            f"{path} was written by {state.world_size} process(es) but this run has "
            f"{accelerator.num_processes}; resume with launcher.num_processes={state.world_size}"
        )
    from moa_train.model import WEIGHTS_NAME

    model.load_adapter_weights(load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
    meta = read_json(path / "optimizer.json")
    here = [n for n, _ in _named_in_order(optimizer, model)]
    if meta["param_names"] != here:
        raise MoATrainError(f"{path}: the optimizer state belongs to other trainable parameters")
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(
        {"state": shard_like_params(optimizer, per_param), "param_groups": meta["param_groups"]}
    )
    scheduler.load_state_dict(read_json(path / "scheduler.json"))
    if scaler is not None:
        scaler_state = read_json(path / "scaler.json")
        if scaler_state:
            scaler.load_state_dict(scaler_state)
    rank = accelerator.process_index
    set_rng_state(
        load_file(str(path / f"rng-rank{rank}.safetensors")), read_json(path / f"rng-rank{rank}.json")
    )
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


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoATrainError(f"{path} is missing; the checkpoint is incomplete") from None
    except json.JSONDecodeError as exc:
        raise MoATrainError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
