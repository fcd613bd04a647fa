"""DTensor helpers the core needs to read, write and save adapters that FSDP2 may have sharded.

Every function is a no-op on plain tensors, so the same model code runs unsharded; the sharding itself
(``launcher=fsdp``) lives in :mod:`moa_train.train.fsdp`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from moa_train.core.inject import find_decoder_layers


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: call on every rank), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def like_param(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` (the whole tensor, present on every rank) laid out like ``param``: this rank's shard of a
    DTensor parameter (no communication: every rank slices its own part), else ``full`` on its device."""
    full = full.to(device=param.device, dtype=param.dtype)
    if not is_dtensor(param):
        return full

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def shard_like_params(
    optimizer: torch.optim.Optimizer, per_param: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Whole optimizer-state tensors (as saved) laid out like their parameters: under FSDP each rank keeps
    its shard of the moments; the scalar ``step`` and unsharded parameters' states pass unchanged."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in per_param.items():
        param = params[index]
        if not is_dtensor(param):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
                values[key] = like_param(param, value)
    return per_param


@contextlib.contextmanager
def gathered_adapters(model: Any) -> Iterator[None]:
    """While inside, the adapters are whole tensors on every rank (``adapter_state_dict()`` /
    ``save_pretrained`` see the full weights). A collective: enter on every rank. No-op unsharded."""
    units = [
        layer.moa for layer in find_decoder_layers(model.base_model) if _is_fsdp(getattr(layer, "moa", None))
    ]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _is_fsdp(module: nn.Module | None) -> bool:
    return isinstance(module, FSDPModule)


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm over DTensor gradients is itself a DTensor: its whole value (every rank)."""
    return full_tensor(norm)
