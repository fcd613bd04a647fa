"""Optimizer and learning-rate schedule: AdamW with weight decay on matrices only, the paper's
``blr x batch / 256`` rule, and a per-step warmup + cosine / constant / linear multiplier."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from moa_train.errors import MoATrainError
from moa_train.train.options import OPTIMIZERS, SCHEDULES


def learning_rate(opt_cfg: DictConfig, global_batch: int) -> float:
    """``optimizer.lr`` if set, else the paper's rule ``blr x effective_batch / 256``."""
    if opt_cfg.get("lr") is not None:
        return float(opt_cfg.lr)
    if opt_cfg.get("blr") is None:
        raise MoATrainError("set optimizer.lr (absolute) or optimizer.blr (scaled by effective_batch/256)")
    return float(opt_cfg.blr) * global_batch / 256


def build_optimizer(model: torch.nn.Module, opt_cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on >=2-D weights only (biases, norms, gates and 1-D tensors get none)."""
    if str(opt_cfg.get("name", "adamw")) not in OPTIMIZERS:
        raise MoATrainError(
            f"optimizer.name={opt_cfg.name!r} is not known; the recipe supports {', '.join(OPTIMIZERS)}"
        )
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith("bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(opt_cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps))


def replan_schedule(scheduler: Any, total_steps: int) -> None:
    """LambdaLR restores the saved plan; a resume with a new trainer.max_steps re-plans the decay over
    it (an extended run would otherwise go on at min_lr), from the current step on."""
    changed = False
    for schedule in scheduler.lr_lambdas:
        if isinstance(schedule, LRSchedule) and schedule.total != total_steps:
            schedule.total, changed = total_steps, True
    if changed:
        groups = scheduler.optimizer.param_groups
        for group, base, schedule in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]


class LRSchedule:
    """Multiplier of the base lr at optimizer step ``s`` (LambdaLR): linear warmup from 0, then
    a per-iteration half-cosine to ``min_lr``, a constant, or a linear decay to ``min_lr``."""

    def __init__(self, name: str, warmup: int, total: int, min_ratio: float) -> None:
        if name not in SCHEDULES:
            raise MoATrainError(f"scheduler.name={name!r} is not known; choose one of {', '.join(SCHEDULES)}")
        self.name, self.warmup, self.total, self.min_ratio = name, warmup, total, min_ratio

    @classmethod
    def from_config(cls, sc: DictConfig, lr: float, total: int, steps_per_epoch: int) -> LRSchedule:
        if sc.get("warmup_steps") is not None and sc.get("warmup_epochs") is not None:
            raise MoATrainError("set scheduler.warmup_steps or scheduler.warmup_epochs, not both")
        if sc.get("warmup_epochs") is not None:
            warmup = round(float(sc.warmup_epochs) * steps_per_epoch)
        else:
            warmup = int(sc.get("warmup_steps") or 0)
        min_ratio = float(sc.get("min_lr") or 0.0) / lr if lr > 0 else 0.0
        return cls(str(sc.name), min(warmup, total), total, min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.name == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape
