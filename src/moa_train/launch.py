"""``launcher=accelerate``: run the recipe in N data-parallel worker processes.

Only the launching process composes the config with Hydra. It writes the resolved config to
``<run dir>/config.yaml`` and starts ``accelerate launch ... -m moa_train.launch <run dir>``; every
worker reads that file, so all ranks share one config and one run dir (no per-rank timestamps).
On CPU the workers form a gloo group: ``--multi_gpu`` together with ``ACCELERATE_USE_CPU=1`` is
the combination that really starts N ranks (``--cpu --num_processes N`` starts one), and the
recipe asserts the world size it gets.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moa_train.errors import MoATrainError

log = logging.getLogger(__name__)


def accelerate_command(num_processes: int, run_dir: Path, port: int, extra: list[str]) -> list[str]:
    """The ``accelerate launch`` command line for ``num_processes`` workers on this machine."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(port)]
    # Precision and compilation are the recipe's business (trainer.precision), not the launcher's.
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", *extra]
    return [*cmd, "-m", "moa_train.launch", str(run_dir)]


def launch_workers(cfg: DictConfig, run_dir: Path) -> None:
    """Start the workers on ``run_dir/config.yaml`` and wait; raise if any of them failed."""
    n = int(cfg.launcher.num_processes)
    if n < 1:
        raise MoATrainError(f"launcher.num_processes must be >= 1, got {n}")
    port = int(cfg.launcher.get("main_process_port") or _free_port())
    cmd = accelerate_command(n, run_dir, port, [str(a) for a in cfg.launcher.get("extra_args") or []])
    env = dict(os.environ)
    if str(cfg.trainer.get("device", "auto")) == "cpu" or not _cuda_available():
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("launching %d worker(s): %s", n, " ".join(cmd))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise MoATrainError(
            f"the {n} accelerate worker(s) failed (exit status {result.returncode}); "
            f"their output is above and in {run_dir / 'train.log'}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_main(argv: list[str] | None = None) -> Any:
    """Entry point of one worker: ``python -m moa_train.launch <run dir>`` (started by accelerate)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m moa_train.launch <run dir holding config.yaml>")
    run_dir = Path(args[0])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    from moa_train.train import train  # after the config: a bad path fails before torch loads

    try:
        return train(cfg, run_dir, expected_world_size=int(cfg.launcher.num_processes))
    except MoATrainError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    worker_main()
