"""Process plumbing around the recipe: worker logging, the progress bar, durations, Accelerate state."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState
from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """Rank 0's bar: step n/total, elapsed<ETA, loss and tokens/s (refreshed at log steps)."""
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
        mininterval=1.0,
    )  # fmt: skip


def worker_logging(run_dir: Path, main: bool) -> None:
    """Workers started by `accelerate launch` have no Hydra logging: rank 0 logs to the run's log."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=handlers,
        force=True,
    )


def reset_accelerate_state() -> None:
    """Let a later job of the same process (a Hydra sweep) build a fresh Accelerator."""
    with contextlib.suppress(Exception):
        AcceleratorState._reset_state(reset_partial_state=True)
