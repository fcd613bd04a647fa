"""MoA inside ``transformers.Trainer`` and TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...).

``MoATrainer`` (or ``moa_trainer(SFTTrainer)``, ``moa_trainer(DPOTrainer)``: the same mixin over any Trainer
subclass) takes a :class:`~moa_train.core.model.MoAModel` as Trainer takes a PeftModel and adds what a plain
Trainer cannot know about it:

- checkpoints hold ``adapter_config.json`` + ``adapter_model.safetensors`` only (Trainer saves a full
  ``model.safetensors`` for any model that is not a PreTrainedModel / PeftModel); ``resume_from_checkpoint``
  and ``load_best_model_at_end`` read them back;
- the routers' coefficient-weighted aux losses are added to the training loss (scaled for gradient
  accumulation as Trainer scales the loss it gets), and global-batch load balance restarts every step;
- :class:`MoACallback` adds the aux losses and router telemetry (``router/...``) to every training log,
  ahead of the ``report_to`` loggers, so W&B / TensorBoard get them;
- DPO's reference model is the base with every adapter disabled (:class:`MoAReference`, sharing the
  weights), as TRL does for a PEFT model.

A model that is not a MoAModel goes through the wrapped trainer unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from moa_train.core.model import WEIGHTS_NAME, MoAModel
from moa_train.errors import MoATrainError
from moa_train.train.metrics import router_metrics

__all__ = ["MoACallback", "MoAReference", "MoATrainer", "MoATrainerMixin", "moa_trainer", "unwrap_moa"]

TRAINING_ARGS_NAME = "training_args.bin"  # Trainer's own record of its arguments (as Trainer writes it)


def unwrap_moa(model: Any) -> MoAModel | None:
    """The MoAModel inside DDP / accelerate wrappers (``.module``), or None for any other model."""
    while model is not None:
        if isinstance(model, MoAModel):
            return model
        model = getattr(model, "module", None)
    return None


class MoAReference(nn.Module):
    """The base model of ``model`` with every adapter disabled: DPO's reference, without a second copy.

    The MoA model is held as a plain attribute (not a submodule), so the reference has no parameters of its
    own for an optimizer or a device move to touch. The policy's aux losses of the step survive the
    reference forward (which runs after the policy forward in DPO), so the trainer adds the right ones.
    """

    def __init__(self, model: MoAModel) -> None:
        super().__init__()
        self.__dict__["moa"] = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        moa: MoAModel = self.__dict__["moa"]
        aux = moa._state.aux
        try:
            with moa.disable_adapter():
                return moa.base_model(*args, **kwargs)
        finally:
            moa._state.aux = aux

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["moa"], name)


class MoACallback(TrainerCallback):
    """Starts each optimizer step for global-batch load balance and adds, to every training log, the mean
    weighted aux loss (``aux_loss``), each unweighted aux loss (``aux/<name>``) and the router telemetry
    since the previous log (``router/<name>``: averages over layers, as moa-train logs them).

    :class:`MoATrainerMixin` installs it first in the callback list: callbacks run in order and the
    ``report_to`` loggers only see what earlier callbacks put in the logs.
    """

    def __init__(self) -> None:
        self._aux: dict[str, torch.Tensor] = {}
        self._count = 0

    def record(self, weighted: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """Add one training forward's aux losses (kept as tensors: no host sync until the log step)."""
        for name, value in {"aux_loss": weighted, **{f"aux/{k}": v for k, v in losses.items()}}.items():
            value = value.detach().float()
            self._aux[name] = self._aux[name] + value if name in self._aux else value
        self._count += 1

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        moa = unwrap_moa(model)
        if moa is not None:
            moa.begin_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        moa = unwrap_moa(kwargs.get("model"))
        if moa is None or logs is None or "loss" not in logs:
            return  # only the training log lines (evaluation logs carry eval_loss)
        if self._count:
            logs.update({name: float(total) / self._count for name, total in self._aux.items()})
            self._aux, self._count = {}, 0
        stats = moa.router_stats(reset=True)
        if stats.get("experts") and stats.get("tokens"):
            # the per-layer keys (router/L<i>/...) are moa-train's heat-map material; a Trainer log line
            # gets the layer averages only, or every console log would print hundreds of numbers
            logs.update({k: v for k, v in router_metrics(stats).items() if not k.startswith("router/L")})
            for j, expert in enumerate(stats["experts"]):
                gates = [row[j] for row in stats["mean_gate"] if not math.isnan(row[j])]
                if gates:
                    logs[f"router/{expert}/mean_gate"] = sum(gates) / len(gates)


@contextlib.contextmanager
def _fused_head_on_base_model(trainer_cls: type) -> Iterator[None]:
    """While a TRL trainer initialises: put its fused LM head on the HF model inside a MoAModel.

    TRL patches ``model.forward`` with a fused LM head that runs ``model.base_model`` as the backbone. On a
    MoAModel ``base_model`` is the whole causal LM, so the patch goes to that causal LM instead (once, with
    the policy's outputs; the reference shares it): MoAModel.forward and MoAReference.forward call it, and
    its MoA hooks still run, since they sit on its modules. Patching an already patched model is safe:
    the fused path never calls the previous forward, the plain path goes through it unchanged.
    """
    modules = {
        sys.modules[c.__module__]
        for c in trainer_cls.__mro__
        if callable(getattr(sys.modules.get(c.__module__), "add_fused_lm_head", None))
    }
    originals = {module: module.add_fused_lm_head for module in modules}

    patched: set[int] = set()  # HF models patched by this trainer (the reference shares the policy's)

    def redirect(original: Any) -> Any:
        @functools.wraps(original)
        def add_fused_lm_head(model: Any, *args: Any, **kwargs: Any) -> Any:
            moa = unwrap_moa(model.__dict__.get("moa") if isinstance(model, MoAReference) else model)
            if moa is None:
                return original(model, *args, **kwargs)
            if id(moa.base_model) not in patched:  # a later trainer patches again, with its own outputs
                patched.add(id(moa.base_model))
                original(moa.base_model, *args, **kwargs)
            return None

        return add_fused_lm_head

    for module, original in originals.items():
        module.add_fused_lm_head = redirect(original)
    try:
        yield
    finally:
        for module, original in originals.items():
            module.add_fused_lm_head = original


class MoATrainerMixin:
    """Mixin over a Trainer class for a MoAModel: see the module docstring. Use :func:`moa_trainer`."""

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        moa = unwrap_moa(model)
        takes_ref = "ref_model" in inspect.signature(super().__init__).parameters
        if moa is not None and takes_ref and kwargs.get("ref_model") is None:
            kwargs["ref_model"] = MoAReference(moa)  # DPO & co.: the base, adapters disabled
        with _fused_head_on_base_model(type(self)):
            super().__init__(model, *args, **kwargs)
        self._moa_callback = MoACallback()
        self.callback_handler.callbacks.insert(0, self._moa_callback)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        moa = unwrap_moa(model)
        if moa is None or not model.training:
            return result
        aux = moa.aux_loss()
        self._moa_callback.record(aux, moa.aux_losses())
        # Trainer divides the returned loss by the accumulation steps unless it is already normalised over
        # the whole accumulated batch; the aux loss is a per-forward mean, so it needs that division itself
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if scaled:
            # (set by the training loop; the configured value outside it, e.g. in a direct call)
            aux = aux / getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
        if return_outputs:
            loss, outputs = result
            return loss + aux, outputs
        return result + aux

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        moa = unwrap_moa(self.model)
        if moa is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        moa.save_pretrained(output_dir)  # adapter_config.json + adapter_model.safetensors, atomic
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_adapters(self, directory: str, model: Any = None) -> bool:
        moa = unwrap_moa(model if model is not None else self.model)
        if moa is None:
            return False
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise MoATrainError(f"no {WEIGHTS_NAME} in {directory}; pass a checkpoint written by MoATrainer")
        from moa_train.files import read_tensors  # one-line errors for truncated or garbage files

        moa.load_adapter_weights(read_tensors(Path(path)), source=path)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._load_adapters(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._load_adapters(best):
            super()._load_best_model()


@functools.cache
def moa_trainer(trainer_cls: type = Trainer) -> type:
    """``trainer_cls`` (Trainer or a subclass such as TRL's SFTTrainer / DPOTrainer) made MoA-aware."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise MoATrainError(f"moa_trainer() takes a transformers.Trainer subclass, got {trainer_cls!r}")
    return type(
        f"MoA{trainer_cls.__name__}",
        (MoATrainerMixin, trainer_cls),
        {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} for a MoAModel ({__name__})."},
    )


MoATrainer = moa_trainer(Trainer)
