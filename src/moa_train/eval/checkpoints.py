"""Checkpoints, run configs and models for moa-eval: resolve a run or checkpoint dir, read what the
training run recorded (precision, final-eval settings, W&B id) and load the base model with its adapters."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moa_train.data.template import TEMPLATES
from moa_train.errors import MoATrainError
from moa_train.eval.generation import model_device
from moa_train.rundir import (  # noqa: F401 (resolve_checkpoint re-exported)
    ADAPTER_CONFIG,
    STATE_NAME,
    refuse_code_from_file,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run (HydraConfig when running, else a composed ``hydra`` node)."""
    with contextlib.suppress(Exception):
        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    node = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    return list(node) if node is not None else []


def base_model_node(cfg: DictConfig, adapter_config: Mapping[str, Any] | None) -> Any:
    """The ``model`` node to load: the checkpoint's (adapter_config.json["model"]) unless ``model=`` was given.

    Field overrides such as ``model.dtype=bfloat16`` apply on top of the checkpoint's node.
    """
    overrides = _task_overrides(cfg)
    chosen = any(re.match(r"^[+~]*model=", o) for o in overrides)
    saved = (adapter_config or {}).get("model")
    if chosen or not saved:
        if adapter_config is not None and not saved and not chosen:
            log.warning(
                "the checkpoint does not record its base model; using model=%s", cfg.model.get("name")
            )
        return cfg.model
    node = OmegaConf.create(saved)
    fields_set = [o.split("model.", 1)[1] for o in overrides if re.match(r"^[+~]*model\.", o)]
    command_line = OmegaConf.create({"model": OmegaConf.from_dotlist(fields_set)})
    refuse_code_from_file({"model": saved}, command_line, source=f"the checkpoint's {ADAPTER_CONFIG}")
    return OmegaConf.merge(node, OmegaConf.from_dotlist(fields_set)) if fields_set else node


def load_model_for_eval(
    cfg: DictConfig, ckpt_dir: Path | None, precision: str = "fp32"
) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, model node): the base model alone, or with the checkpoint's adapters.

    With bf16/fp16 the frozen base is cast to that dtype before the adapters (fp32) are attached,
    as moa-train does ("frozen base in the compute dtype"): the residual stream then has the same
    dtype as during training and its final evaluation, not just the autocast matmuls.
    """
    # deferred: transformers loads only when a model is loaded, after validation
    from moa_train.core.model import MoAModel
    from moa_train.models.base import load_base_model, place_base

    adapter_config = MoAModel.read_config(ckpt_dir) if ckpt_dir else None
    node = base_model_node(cfg, adapter_config)
    base, tokenizer = load_base_model(node)
    if PRECISIONS[precision] is not None:  # a quantized base keeps its packed weights (place_base)
        place_base(base, next(base.parameters()).device, PRECISIONS[precision])
    if ckpt_dir is None:
        return base, tokenizer, node
    try:
        model = MoAModel.from_pretrained(base, ckpt_dir)
    except MoATrainError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoATrainError(
            f"checkpoint {ckpt_dir} does not fit base model {node.get('name')}: {first}"
        ) from None
    return model, tokenizer, node


def find_run_config(ckpt_dir: Path | None) -> DictConfig | None:
    """The moa-train run config (``<run dir>/config.yaml``) of a ``final/`` or ``checkpoints/step-N/`` dir."""
    if ckpt_dir is None:
        return None
    for parent in (ckpt_dir.parent, ckpt_dir.parent.parent):
        path = parent / "config.yaml"
        if path.is_file():
            with contextlib.suppress(Exception):  # an unrelated or damaged file only loses the defaults
                loaded = OmegaConf.load(path)
                if isinstance(loaded, DictConfig) and "trainer" in loaded:
                    return loaded
    return None


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunSettings:
    """Evaluation settings after resolving ``auto`` (and the ``heldout`` preset) against the training run."""

    batch_size: int
    precision: str
    decoding: Any = "greedy"
    max_new_tokens: Any = None
    template: str = "alpaca"


def resolve_run_settings(
    cfg: DictConfig, run_cfg: DictConfig | None, recorded_precision: str | None = None
) -> RunSettings:
    """``auto`` = what the training run's final evaluation used (so a checkpoint scores exactly as the
    quickstart printed: same batches, same base dtype and autocast), else batch 16 in fp32.

    ``recorded_precision`` (adapter_config.json ``precision``, when the trainer records it) wins over
    the run config, so a checkpoint copied away from its run dir keeps its precision. With the
    ``heldout`` preset (``eval.data=run``) the run's ``final_eval`` decoding and max-new-tokens are
    used too, unless given on the command line.
    """
    final = OmegaConf.select(run_cfg, "final_eval", default=None) if run_cfg is not None else None
    batch = cfg.get("batch_size", "auto")
    if batch in (None, "auto"):
        batch = (final or {}).get("batch_size") or 16
    precision = str(cfg.get("precision") or "auto")
    if precision == "auto" and recorded_precision:
        precision = str(recorded_precision)
    if precision == "auto":
        precision = str(
            OmegaConf.select(run_cfg, "trainer.precision", default="fp32") if run_cfg is not None else "fp32"
        )
    if precision not in PRECISIONS:
        raise MoATrainError(f"precision={precision!r} is not known; choose auto, fp32, bf16 or fp16")
    if int(batch) < 1:
        raise MoATrainError(f"batch_size must be >= 1 (or auto), got {batch}")
    decoding, max_new = cfg.get("decoding"), cfg.get("max_new_tokens")
    if OmegaConf.select(cfg, "eval.data", default=None) == "run" and final is not None:
        given = _task_overrides(cfg)
        if final.get("decoding") and not any(re.match(r"^[+~]*decoding[=.]", o) for o in given):
            decoding = final.get("decoding")
        if max_new is None:
            max_new = final.get("max_new_tokens")
    # the prompt template the checkpoint was trained with (data.template), unless given
    template = str(cfg.get("template") or "auto")
    if template == "auto":
        recorded = OmegaConf.select(run_cfg, "data.template", default=None) if run_cfg is not None else None
        template = str(recorded or "alpaca")
    if template not in TEMPLATES:
        raise MoATrainError(f"template={template!r} is not known; choose auto, {', '.join(TEMPLATES)}")
    return RunSettings(
        batch_size=int(batch),
        precision=precision,
        decoding=decoding,
        max_new_tokens=max_new,
        template=template,
    )


def recorded_precision(ckpt_dir: Path | None) -> str | None:
    if ckpt_dir is None:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        value = json.loads((ckpt_dir / ADAPTER_CONFIG).read_text()).get("precision")
        return str(value) if value in PRECISIONS else None
    return None


def autocast_for(model: torch.nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The trainer's autocast for a precision (fp32: none); weights keep their own dtype."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def training_run_id(ckpt_dir: Path | None) -> str | None:
    """The W&B run id the trainer recorded in the checkpoint (trainer_state.json ``wandb_id``), if any."""
    if ckpt_dir is None:
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        return json.loads((ckpt_dir / STATE_NAME).read_text()).get("wandb_id")
    return None
