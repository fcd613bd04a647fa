"""MoAModel: a stock HF causal LM with MoA experts attached; PEFT-style save / load / disable."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from moa_train.core.config import MoAConfig, check_moa_config
from moa_train.core.dist import like_param
from moa_train.core.inject import find_decoder_layers, inject, restore_attention
from moa_train.core.layer import MoALayer, MoAState, aux_value
from moa_train.core.routers import Router
from moa_train.core.segments import positions_from_segments
from moa_train.core.telemetry import summarize
from moa_train.errors import MoATrainError
from moa_train.files import atomic_path, read_json, read_tensors, write_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
ADAPTER_TAG = ".moa."  # every adapter / router parameter lives under <decoder layer>.moa.


def parameter_type(name: str) -> str:
    """Expert type of an adapter parameter name, for the trainable-parameter breakdown."""
    if ".threshold." in name:
        return "threshold"
    if ".router." in name:
        return "router"
    for kind in ("lora", "ffn", "prompt", "pa"):
        if f".moa.{kind}." in name:
            return kind
    return "other"


class MoAModel(nn.Module):
    """Wraps ``base_model`` (frozen) with the experts and routers described by ``config``."""

    def __init__(self, base_model: nn.Module, config: MoAConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.moa_config = config
        self._state = MoAState(config.sparse_impl)
        for param in base_model.parameters():
            param.requires_grad_(False)
        self._moa_layers, self._handles = inject(base_model, config, self._state)
        for index, moa in enumerate(self._moa_layers):  # the pool key of router.aux_pool=layer
            for module in () if moa is None else moa.modules():
                if isinstance(module, Router):
                    module.layer_index = index
        for name, param in base_model.named_parameters():
            if ADAPTER_TAG in name:
                param.requires_grad_(True)

    # -- forward / generation ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        instance_mask: torch.Tensor | None = None,
        task_types: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Same arguments as the base model (named, so that ``transformers.Trainer`` keeps the usual dataset
        columns, as for a PeftModel). ``instance_mask`` [B, T] overrides the tokens that an
        instance-level router averages over (default: the prompt, i.e. labels == -100, or all tokens).
        ``task_types`` [B] (0/1) is each example's task type for LoRAMoE's localized balancing constraint.
        ``segment_ids`` [B, T] marks packed rows (1, 2, ... per example, 0 padding; data/packing.py): pass
        ``attention_mask=None`` and per-example ``position_ids`` (derived from the segments when None), from
        which transformers builds the block-diagonal causal mask; routers then pool and count per example."""
        if segment_ids is not None:
            if attention_mask is not None:
                raise MoATrainError(
                    "segment_ids (packed rows) go with attention_mask=None: transformers builds the "
                    "per-example mask from the position ids"
                )
            if position_ids is None:
                position_ids = positions_from_segments(segment_ids)
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
            "use_cache": use_cache,
        }
        # unset arguments stay unset: the base model's own defaults apply, as when it is called directly
        kwargs.update({k: v for k, v in named.items() if v is not None})
        self._state.explicit_instance_mask = instance_mask
        self._state.task_types = task_types
        self._state.segment_ids = segment_ids
        try:
            return self.base_model(**kwargs)
        finally:
            self._state.explicit_instance_mask = None
            self._state.task_types = None
            self._state.segment_ids = None

    def begin_step(self) -> None:
        """Call at the start of every optimizer step (before its first micro-batch): resets the counts of
        global-batch load balance (router.balance_scope=global), which then sums them over every
        micro-batch of the step and, when torch.distributed is initialised, over all ranks."""
        reduce = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:

            def reduce(counts: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(counts)
                return counts

        self._state.begin_step(reduce)

    def generate(self, *args: Any, **kwargs: Any):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # -- losses and telemetry ----------------------------------------------------------------------
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted aux losses of the last forward, each summed over every router (layers, sites)."""
        return {name: aux_value(total) for name, (total, _) in self._state.aux.items()}

    def aux_loss(self) -> torch.Tensor:
        """Sum of coefficient × aux loss for the last forward (0 when every coefficient is 0)."""
        total = torch.zeros((), device=self._device())
        for loss, coef in self._state.aux.values():
            total = total + coef * aux_value(loss)
        return total

    def _primary_routers(self) -> list[tuple[int, MoALayer, nn.Module, list[str]]]:
        """Per layer: the block router, else the FFN-down site router (else the first site router)."""
        found = []
        for index, moa in enumerate(self._moa_layers):
            if moa is None:
                continue
            if moa.router is not None:
                found.append((index, moa, moa.router, list(moa.router_outputs)))
                continue
            site_routers = [(s, m.router) for s, m in moa.lora.items() if m.router is not None]
            for extra, module in (("ffn", moa.ffn), ("pa", moa.pa), ("prompt", moa.prompt)):
                if module is not None and module.router is not None:
                    site_routers.append((extra, module.router))
            if site_routers:
                # the FFN-down site router, or the router of the block-level FFN experts (one per FFN)
                site, router = next(
                    ((s, r) for s, r in site_routers if s in ("down", "ffn")), site_routers[0]
                )
                found.append((index, moa, router, [f"{site}.e{i}" for i in range(router.num_experts)]))
        return found

    def router_stats(self, reset: bool = False) -> dict[str, Any]:
        """Per layer x expert statistics since the last reset (one host sync, here).

        Layers with different expert sets (layer spans) share one column list; absent experts are NaN.
        """
        routers = self._primary_routers()
        if not routers:
            return {"layers": [], "experts": [], "tokens": 0}
        experts: list[str] = []
        for _, _, _, names in routers:
            experts += [n for n in names if n not in experts]
        stats = {k: v.detach().cpu() for k, v in summarize([r.telemetry for _, _, r, _ in routers]).items()}

        def spread(matrix: torch.Tensor) -> list[list[float]]:
            table = []
            for row, (_, _, _, names) in zip(matrix.tolist(), routers):
                by_name = dict(zip(names, row))
                table.append([by_name.get(n, float("nan")) for n in experts])
            return table

        result = {
            "layers": [i for i, _, _, _ in routers],
            "experts": experts,
            "tokens": int(stats["tokens"].max().item()),
            "mean_gate": spread(stats["mean_gate"]),
            "active_frac": spread(stats["active_frac"]),
            "active_per_token": stats["active_per_token"].tolist(),
            "entropy": stats["entropy"].tolist(),
            "mean_threshold": stats["mean_threshold"].tolist()
            if bool(stats["has_threshold"].any())
            else None,
        }
        if reset:
            self.reset_router_stats()
        return result

    def reset_router_stats(self) -> None:
        for module in self.base_model.modules():
            if hasattr(module, "telemetry") and module.__class__.__name__ == "Router":
                module.telemetry.reset()

    @contextlib.contextmanager
    def capture_gates(self, primary_only: bool = False) -> Iterator[list[torch.Tensor]]:
        """Collect router weights ([B, T, E]) in call order while the block runs.

        ``primary_only``: only each layer's primary router, the one ``router_stats()`` reports (the block
        router, else the FFN-down site router), so a forward yields exactly one tensor per routed layer
        also for homogeneous per-site baselines (MoLoRA, Top-K, ...), whose sites each have a router.
        """
        captured: list[torch.Tensor] = []
        state = self._state
        state.capture = captured
        state.capture_only = {id(r) for _, _, r, _ in self._primary_routers()} if primary_only else None
        try:
            yield captured
        finally:
            state.capture, state.capture_only = None, None

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the plain base model: no expert, no router, no prompt attention."""
        self._state.enabled = False
        try:
            yield
        finally:
            self._state.enabled = True

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """PEFT's spelling of :meth:`disable_adapters` (TRL and PEFT-style code call this one)."""
        return self.disable_adapters()

    def set_telemetry(self, enabled: bool) -> None:
        self._state.collect_stats = enabled

    # -- parameters -------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.base_model.named_parameters() if ADAPTER_TAG in n}

    def num_trainable_parameters(self, by_type: bool = False) -> int | dict[str, int]:
        counts: dict[str, int] = {}
        for name, param in self.base_model.named_parameters():
            if param.requires_grad:
                kind = parameter_type(name)
                counts[kind] = counts.get(kind, 0) + param.numel()
        total = sum(counts.values())
        return {**counts, "total": total} if by_type else total

    def print_trainable_parameters(self) -> None:
        trainable = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.base_model.parameters())
        by_type = self.num_trainable_parameters(by_type=True)
        parts = ", ".join(f"{k}: {v:,}" for k, v in by_type.items() if k != "total")
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f} ({parts})"
        )

    def has_conditional_parameters(self) -> bool:
        """True when some adapter parameters can get no gradient in a step: sparse routing skips experts,
        and with threshold_grad=none the learned threshold never gets one (spec G.1). Multi-process
        training (DDP) then needs ``find_unused_parameters=True``."""
        routers = [self.moa_config.router]
        if self.moa_config.has_site_routers():
            routers.append(self.moa_config.site_router)
        return any(r.kind != "none" and r.selection != "dense" for r in routers)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """As the HF model's (same argument, also positional, as TRL passes it); non-reentrant by default."""
        # Non-reentrant: gates are computed outside the checkpointed layer body and must get gradients.
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not kwargs["use_reentrant"]:
            # Only reentrant checkpointing needs an input that requires grad; transformers' embedding hook
            # forcing one costs a backward through layer 0's input and is a graph break under torch.compile.
            self.base_model.disable_input_require_grads()

    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # -- save / load ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, extra_config: dict | None = None) -> None:
        """Write adapter_config.json + adapter_model.safetensors (adapters and routers only)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.adapter_state_dict().items()}
        config = {
            "format_version": FORMAT_VERSION,
            "moa_config": self.moa_config.to_dict(),
            **(extra_config or {}),
        }
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_atomic(path / CONFIG_NAME, json.dumps(config, indent=2, default=str))

    @staticmethod
    def read_config(directory: str | os.PathLike) -> dict[str, Any]:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise MoATrainError(
                f"no {CONFIG_NAME} in {directory}; pass a directory written by save_pretrained"
            )
        data = read_json(path, dict)
        if not isinstance(data.get("moa_config", {}), dict) or not isinstance(data.get("model") or {}, dict):
            raise MoATrainError(
                f"{path}: 'moa_config' and 'model' must be JSON objects; the checkpoint is damaged"
            )
        if "moa_config" in data:
            check_moa_config(data["moa_config"], f"{path} moa_config")
        return data

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike) -> MoAModel:
        """Attach the saved experts to a fresh ``base_model`` and load their weights."""
        data = cls.read_config(directory)
        if "moa_config" not in data:
            raise MoATrainError(
                f"{Path(directory) / CONFIG_NAME} has no 'moa_config'; it is not a moa_train adapter"
            )
        saved = dict(data["moa_config"])
        # adapters saved before prompt_moe_form existed were trained with a softmax and gate per group
        saved.setdefault("prompt_moe_form", "per_group")
        model = cls(base_model, MoAConfig.from_dict(saved))
        weights_path = Path(directory) / WEIGHTS_NAME
        if not weights_path.is_file():
            raise MoATrainError(f"no {WEIGHTS_NAME} in {directory}; the checkpoint is incomplete")
        model.load_adapter_weights(read_tensors(weights_path), source=str(weights_path))
        return model

    def load_adapter_weights(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            name = (missing or unexpected)[0]
            raise MoATrainError(
                f"{source} does not fit this model: {len(missing)} adapter tensors missing, "
                f"{len(unexpected)} unexpected (e.g. {name}); load it into the base model it was trained on"
            )
        for name, param in own.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise MoATrainError(
                    f"{source} does not fit this model: {name} has shape {list(tensors[name].shape)} "
                    f"but the model expects {list(param.shape)}; pass the base model it was trained on (model=...)"
                )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(like_param(param, tensors[name]))  # FSDP: this rank's shard of it

    def unload(self) -> nn.Module:
        """Remove every hook and expert; return the untouched base model."""
        for handle in self._handles:
            handle.remove()
        for layer in find_decoder_layers(self.base_model, self.moa_config):
            if hasattr(layer, "moa"):
                del layer.moa
            for module in layer.modules():  # the attention (prompt expert) and MoE experts (routed LoRA)
                module.__dict__.pop("_moa_layer", None)
                module.__dict__.pop("_moa_routed", None)
        restore_attention(self.base_model)
        return self.base_model


def get_moa_model(model: nn.Module, config: MoAConfig | dict) -> MoAModel:
    """Attach MoA experts and routers to a Hugging Face causal LM (its weights are frozen)."""
    if isinstance(config, dict):
        config = MoAConfig.from_dict(config)
    return MoAModel(model, config)
