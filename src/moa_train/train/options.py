"""The values the training recipe accepts for its own options, owned here and read without torch by
``moa-train`` validation (so the two cannot drift)."""

from __future__ import annotations

PRECISION_NAMES = ("bf16", "fp16", "fp32")  # trainer.precision: autocast dtype (fp32: none)
SCHEDULES = ("cosine", "constant", "linear")  # scheduler.name
OPTIMIZERS = ("adamw",)  # optimizer.name
LAUNCHERS = ("local", "accelerate", "fsdp")  # launcher.name: one process, DDP workers, FSDP2 workers
LOGGERS = ("wandb", "tensorboard", "mlflow", "none")  # logger.name (train/loggers.py builds them)
