"""``launcher=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) applied by moa_train itself.

Accelerate (or torchrun) only starts the processes; the sharding happens here, one code path on CPU
(gloo) and CUDA (NCCL) — Accelerate's own FSDP plugin is ignored on CPU, where it silently wraps the
model in DDP instead, so relying on it would leave the CPU tests proving nothing.

Units (scale_out.md §2: one dtype and one ``requires_grad`` per unit):
  * each decoder layer's ``moa`` submodule (fp32 adapters and routers) is its own unit;
  * each decoder layer (the frozen base weights, in the compute dtype) is a unit;
  * the root unit holds the rest of the base (embeddings, final norm, LM head).

The adapters run from hooks inside the decoder layer, never through ``moa.forward``, so FSDP's own
pre-forward hook would never all-gather them. A pre-hook on the decoder layer unshards the ``moa`` unit
explicitly; it stays unsharded until backward ends, when FSDP's final backward callback reduce-scatters
its gradients and reshards it (the adapters are small next to the layer). Forwards without gradient
(evaluation) reshard it again after the layer.

Routers that use experts differently on different ranks (sparse threshold, top-k, AdaMoLE, the gather
path) leave some adapter parameters without a gradient on one rank and with one on another. FSDP2 would
then reduce-scatter different sets of tensors per rank and hang (pytorch#158719), so every unit
reduce-scatters unused parameters as zeros (``set_reduce_scatter_unused_params``): every rank sends the
same tensors every step, and a parameter no rank used gets a zero gradient, which leaves AdamW's update
at exactly zero (no weight decay on the 1-D thresholds and gates that can stay unused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from moa_train.core.dist import is_dtensor
from moa_train.core.inject import find_decoder_layers
from moa_train.core.memory import peak_memory_mb
from moa_train.errors import MoATrainError
from moa_train.train.options import LAUNCHERS

PARALLELISM = dict(zip(LAUNCHERS, ("none", "ddp", "fsdp2"), strict=True))  # launcher -> what runs


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def rank0_loading(enabled: bool, quantization: str | None) -> bool:
    """Whether only rank 0 reads the base weights (``launcher.rank0_loading``; not for quantized bases,
    whose quantization happens while loading)."""
    return bool(enabled) and not quantization


def shard_model(
    model: Any,
    device: torch.device,
    *,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    from_rank0: bool = True,
) -> None:
    """Apply FSDP2 to a MoAModel in place (every rank; the process group must exist).

    Call after the adapters are attached (and gradient checkpointing enabled) and before the optimizer
    is built: the optimizer must hold the sharded DTensor parameters. With rank-0 loading the other
    ranks come with a base on the meta device; they get rank 0's weights (base and adapters) here.
    ``from_rank0``: :func:`rank0_loading` of the run; ``cpu_offload`` / ``reshard_after_forward``: FSDP2's.
    """
    if not dist.is_initialized():  # one process (launcher.num_processes=1): a group of one, same code path
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, device_id=_device_id(device)
        )
    if cpu_offload and device.type != "cuda":
        raise MoATrainError("launcher.cpu_offload=true offloads GPU memory; on CPU set it to false")
    from_rank0 = from_rank0 and dist.get_world_size() > 1
    full_state = model.base_model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    if not from_rank0:  # every rank loaded the base; the adapters' init used seed + rank: take rank 0's
        sync_adapters_from_rank0(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    base = model.base_model
    # Quantized weights (bitsandbytes Params4bit / Int8Params) carry their quantization state outside the
    # tensor, which FSDP's DTensor shards lose: they stay whole on every rank (4-bit is already ~1/4 of
    # bf16), the rest of the base and the adapters are sharded.
    ignored = {p for p in base.parameters() if _is_quantized(p)}
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, offload_policy=offload, ignored_params=ignored or None)
    reshard = reshard_after_forward
    for layer in find_decoder_layers(base):
        moa = getattr(layer, "moa", None)
        if moa is not None:
            fully_shard(moa, **common)
        fully_shard(layer, reshard_after_forward=reshard, **common)
        if moa is not None:
            # registered after fully_shard(layer) and prepended: runs before FSDP's and the router's hooks
            layer.register_forward_pre_hook(_unshard_hook(moa), prepend=True)
            layer.register_forward_hook(_reshard_without_grad_hook(moa))
    fully_shard(base, reshard_after_forward=reshard, **common)
    for module in fsdp_modules(base):
        module.set_reduce_scatter_unused_params(True, recurse=False)
    if from_rank0:
        _load_from_rank0(base, full_state, device)


def _load_from_rank0(base: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0's weights into every rank's shards; buffers (also non-persistent ones such as RoPE's
    inverse frequencies, which a meta model lacks) broadcast whole."""
    # deferred: torch.distributed.checkpoint loads only for an FSDP load from rank 0
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() > 0:
        base.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(base, full_state, options=options)
    for buffer in base.buffers():
        dist.broadcast(buffer.data, src=0)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def _unshard_hook(moa: nn.Module):
    def hook(layer: nn.Module, args: Any) -> None:
        moa.unshard()  # a no-op while already unsharded (recomputation under gradient checkpointing)

    return hook


def _reshard_without_grad_hook(moa: nn.Module):
    def hook(layer: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():  # no backward will come to reshard it
            moa.reshard()

    return hook


def sync_adapters_from_rank0(model: Any) -> None:
    """Broadcast rank 0's adapter and router parameters (before sharding) so every rank starts equal."""
    for param in model.adapter_state_dict().values():
        dist.broadcast(param.data, src=0)


def _is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def base_params_per_rank(model: Any) -> int:
    """Base-model elements this rank holds (a DTensor counts its local shard; tied weights once)."""
    seen: dict[int, torch.Tensor] = {}
    for name, param in model.base_model.named_parameters():
        if ".moa." not in name:
            seen.setdefault(id(param), param)
    return sum((p.to_local() if is_dtensor(p) else p).numel() for p in seen.values())


def summary_fields(model: Any, launcher: str) -> dict[str, Any]:
    """What ``summary.json`` records about the parallelism actually in effect."""
    parallelism = "fsdp2" if is_sharded(model.base_model) else PARALLELISM.get(launcher, launcher)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if parallelism == "ddp" and not distributed:
        parallelism = "none"
    fields: dict[str, Any] = {"parallelism": parallelism, "base_params_per_rank": base_params_per_rank(model)}
    if distributed:  # a collective: every rank's own peak (rank 0's alone hides an uneven split)
        peaks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak_memory_mb(model._device()))
        fields["peak_memory_mb_by_rank"] = peaks
    return fields
