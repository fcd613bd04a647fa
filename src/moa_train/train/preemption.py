"""Preemption: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 stop training at the end of the current optimizer step.

SIGUSR2 is what SLURM sends through submitit before a job's time limit (``hydra/launcher=slurm``); after
the checkpoint the sweep job hands it back to submitit, which requeues the job (``moa_train.cli.sweep_jobs``).

The handler only records the signal; the training loop asks :meth:`StopSignal.requested` after each
optimizer step, saves a checkpoint and raises :class:`moa_train.errors.Preempted` (exit status
``EXIT_PREEMPTED``, with a one-line "resume with ..." hint). Under DDP or FSDP the ranks agree
through a small all-reduce on a CPU (gloo) group, so a signal that reaches one rank stops all of
them after the same step, and no device value is read back for it. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moa_train.errors import Preempted
from moa_train.rundir import write_summary
from moa_train.train.checkpoint import TrainState, save_checkpoint

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopSignal:
    """Context manager installing the stop handlers for the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._group = None

    def join(self, world_size: int) -> None:
        """With several processes: a CPU group for the stop vote (collective: all ranks call it)."""
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum
        log.warning("received %s: finishing this optimizer step, then saving a checkpoint", self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def requested(self) -> bool:
        """True on every rank once any rank received a stop signal (call after each optimizer step)."""
        if self._group is None:
            return self.signum is not None

        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())


def stop_on_signal(
    stop: Any, run_dir: Path, state: TrainState, logger: Any, *, saved: bool, **save: Any
) -> None:
    """After the optimizer step that saw a stop signal: save (if this step was not just saved), record
    the stop in ``summary.json`` and raise Preempted (all ranks)."""
    accelerator = save["accelerator"]
    target = run_dir / "checkpoints" / f"step-{state.step}"
    if not saved:
        save_checkpoint(target, state=state, **save)
    message = f"stopped by {stop.name} after step {state.step}; checkpoint {target}"
    if accelerator.is_main_process:
        log.warning(message)
        summary = {
            "status": "preempted",
            "step": state.step,
            "stop_message": message,
            "checkpoint": str(target),
        }
        write_summary(run_dir, summary)
        if logger:
            logger.close()
    accelerator.wait_for_everyone()
    raise Preempted(message, run_dir)
