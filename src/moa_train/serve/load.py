"""What the serving commands share: the settings check, loading a checkpoint, turning a record into
prompt token ids, and the engine built from a composed config (configs/serving.yaml)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moa_train.errors import MoATrainError
from moa_train.eval.checkpoints import (
    autocast_for,
    find_run_config,
    load_model_for_eval,
    recorded_precision,
    resolve_run_settings,
)
from moa_train.eval.generation import encode_prompt
from moa_train.rundir import resolve_checkpoint
from moa_train.serve.engine import Engine, SamplingParams

API_KEY_ENV = "MOA_SERVE_API_KEY"


def _number(
    cfg: DictConfig, key: str, kind: type, low: float | None = None, high: float | None = None
) -> Any:
    value = cfg.get(key)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MoATrainError(f"{key} must be an integer, got {value!r}; e.g. {key}=64")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise MoATrainError(f"{key} must be a number, got {value!r}; e.g. {key}=0.7")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise MoATrainError(f"{key} must be {bounds}, got {value}")
    return value


def sampling_from_config(cfg: DictConfig) -> SamplingParams:
    """The command line's default decoding (greedy unless temperature > 0)."""
    stop = cfg.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MoATrainError(f"seed must be an integer or null, got {seed!r}")
    try:
        return SamplingParams(
            max_new_tokens=_number(cfg, "max_new_tokens", int, 1),
            temperature=float(_number(cfg, "temperature", float, 0.0)),
            top_p=float(_number(cfg, "top_p", float, 0.0, 1.0)),
            seed=seed,
            stop=tuple(str(s) for s in stop),
        ).check()
    except MoATrainError:
        raise


def check_settings(cfg: DictConfig) -> None:
    """Every serving value, before a checkpoint or model is read."""
    sampling_from_config(cfg)
    _number(cfg, "max_batch_size", int, 1)
    if cfg.get("precision") not in ("auto", "fp32", "bf16", "fp16"):
        raise MoATrainError(
            f"precision={cfg.get('precision')!r} is not known; choose auto, fp32, bf16 or fp16"
        )
    threads = cfg.get("cpu_threads")
    if threads is not None:
        _number(cfg, "cpu_threads", int, 1)
    checkpoint = cfg.get("checkpoint")
    if checkpoint in (None, ""):
        raise MoATrainError(
            "no checkpoint given; pass checkpoint=<run dir or checkpoint dir> (checkpoint=base: the base model alone)"
        )
    if str(checkpoint) != "base" and not Path(str(checkpoint)).expanduser().exists():
        raise MoATrainError(
            f"checkpoint not found: {checkpoint}; pass a run dir or a checkpoint dir (adapter_config.json)"
        )


@dataclass
class Loaded:
    """A model ready to generate, and what the commands need to know about it."""

    model: torch.nn.Module
    tokenizer: Any
    name: str  # what clients call it (the API's "model" field)
    checkpoint: Path | None
    precision: str
    template: str  # the training run's prompt template (records with `instruction`)
    context_length: int | None

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.model, self.precision)

    def engine(self, cfg: DictConfig | None = None, **overrides: Any) -> Engine:
        settings = {"max_batch_size": 16, "max_queue": 64}
        if cfg is not None:
            settings.update({k: cfg[k] for k in settings if k in cfg})
        settings.update(overrides)
        return Engine(self.model, self.tokenizer, autocast=self.autocast, **settings)


def load(cfg: DictConfig) -> Loaded:
    """Load the base model and the checkpoint's experts (``checkpoint=base``: the base model alone)."""
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    ckpt = None if str(cfg.checkpoint) == "base" else resolve_checkpoint(str(cfg.checkpoint))
    run_cfg = find_run_config(ckpt)
    eval_like = OmegaConf.create({"precision": cfg.precision, "batch_size": 1, "template": "auto"})
    settings = resolve_run_settings(eval_like, run_cfg, recorded_precision(ckpt))
    model, tokenizer, node = load_model_for_eval(cfg, ckpt, settings.precision)
    model.eval()
    name = cfg.get("served_name") or "auto"
    if name == "auto":
        name = _default_name(ckpt, node)
    config = getattr(getattr(model, "base_model", model), "config", None)
    context = getattr(config, "max_position_embeddings", None)
    return Loaded(model, tokenizer, str(name), ckpt, settings.precision, settings.template, context)


def _default_name(ckpt: Path | None, node: Any) -> str:
    if ckpt is None:
        return str(node.get("name") or "base")
    # runs/<name>/<time>/final -> <name>/<time>; a bare checkpoint dir -> its own name
    ckpt = ckpt.resolve()
    if ckpt.name == "final" or ckpt.parent.name == "checkpoints":
        run = ckpt.parent if ckpt.name == "final" else ckpt.parent.parent
        return f"{run.parent.name}/{run.name}"
    return ckpt.name


def prompt_ids(loaded: Loaded, record: Mapping[str, Any]) -> list[int]:
    """Token ids of a record: ``messages`` (the base's chat template), ``prompt`` (raw text), or
    ``instruction`` (+ ``input``: the template the checkpoint was trained with)."""
    tok = loaded.tokenizer
    if "messages" in record:
        return chat_ids(tok, record["messages"])
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise MoATrainError("'prompt' must be a string")
        return list(tok(record["prompt"])["input_ids"])
    if "instruction" in record:
        return encode_prompt(tok, record, loaded.template)
    raise MoATrainError("a record needs 'prompt' (text), 'messages' (chat) or 'instruction'")


def chat_ids(tokenizer: Any, messages: Any) -> list[int]:
    """The base's chat template over ``messages`` with the assistant turn opened."""
    if not isinstance(messages, list) or not messages:
        raise MoATrainError("'messages' must be a non-empty list of {role, content} objects")
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise MoATrainError("each message needs a string 'content' (and a 'role')")
        if message.get("role") not in ("system", "user", "assistant"):
            raise MoATrainError(f"message role {message.get('role')!r} is not one of system, user, assistant")
    if not getattr(tokenizer, "chat_template", None):
        raise MoATrainError("the base model's tokenizer has no chat template; send 'prompt' text instead")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    out = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def api_key(cfg: DictConfig) -> str | None:
    """``api_key=...`` or ``$MOA_SERVE_API_KEY`` (the environment keeps it out of the process list)."""
    return cfg.get("api_key") or os.environ.get(API_KEY_ENV) or None
