"""``launcher=accelerate``: run the recipe in N data-parallel worker processes.

Only the launching process composes the config with Hydra. It writes the resolved config to
``<run dir>/config.yaml`` and starts ``accelerate launch ... -m moa_train.cli.launch <run dir>``; every
worker reads that file, so all ranks share one config and one run dir (no per-rank timestamps).
On CPU the workers form a gloo group: ``--multi_gpu`` together with ``ACCELERATE_USE_CPU=1`` is
the combination that really starts N ranks (``--cpu --num_processes N`` starts one), and the
recipe asserts the world size it gets.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moa_train.errors import EXIT_PREEMPTED, MoATrainError, Preempted, report
from moa_train.rundir import CONFIG_NAME, read_summary

log = logging.getLogger(__name__)


def accelerate_command(
    num_processes: int,
    run_dir: Path,
    port: int,
    extra: list[str],
    machines: tuple[int, int, str | None] = (1, 0, None),
) -> list[str]:
    """The ``accelerate launch`` command line for ``num_processes`` workers in all, over ``machines`` =
    (num_machines, this machine's rank, address of machine 0); each machine starts its share."""
    num_machines, machine_rank, main_ip = machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--num_machines", str(num_machines), "--main_process_port", str(port)]
        if num_machines > 1:
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_ip)]
    # Precision and compilation are the recipe's business (trainer.precision), not the launcher's.
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", *extra]
    return [*cmd, "-m", "moa_train.cli.launch", str(run_dir)]


def launch_workers(
    cfg: DictConfig, run_dir: Path, config_path: Path | None = None, log_dir: Path | None = None
) -> None:
    """Start the workers on ``config_path`` (default ``run_dir/config.yaml``) and wait.

    The workers' output goes to ``<run dir>/workers.log``; their log records are echoed here, their
    tracebacks are not. A failure is summarised in one line (the first worker error); a stop by a
    signal (the workers saved a checkpoint) raises :class:`Preempted`. A signal sent to this process
    alone is forwarded to the workers, so that they save before they stop.
    """
    n = int(cfg.launcher.num_processes)
    if n < 1:
        raise MoATrainError(f"launcher.num_processes must be >= 1, got {n}")
    config_path = config_path or run_dir / "config.yaml"
    machines = int(cfg.launcher.get("num_machines") or 1)
    # several machines must agree on the port: a free port of this machine is only known here
    port = int(cfg.launcher.get("main_process_port") or (29500 if machines > 1 else _free_port()))
    extra = [str(a) for a in cfg.launcher.get("extra_args") or []]
    where = (machines, int(cfg.launcher.get("machine_rank") or 0), cfg.launcher.get("main_process_ip"))
    cmd = accelerate_command(n, run_dir, port, extra, where)
    cmd.append(str(config_path))
    env = dict(os.environ)
    if str(cfg.trainer.get("device", "auto")) == "cpu" or not _cuda_available():
        env["ACCELERATE_USE_CPU"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) * machines // n)))
    log.info("launching %d worker(s): %s", n, " ".join(cmd))
    log_path = (log_dir or run_dir) / "workers.log"  # machine_rank > 0: outside the shared run dir
    first_error = last_exception = None
    with open(log_path, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        previous = {s: signal.signal(s, _forward(proc)) for s in STOP_SIGNALS}
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                text = line.rstrip("\n")
                if text.startswith("error: ") and first_error is None:
                    first_error = text[len("error: ") :]
                elif EXCEPTION_LINE.match(text):
                    last_exception = text
                elif not NOISE.match(text):
                    print(text, flush=True)
            returncode = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    summary = read_summary(run_dir)
    if summary.get("status") == "preempted":
        raise Preempted(summary.get("stop_message") or f"stopped at step {summary.get('step')}", run_dir)
    if returncode != 0:
        reason = first_error or last_exception or f"exit status {returncode}"
        raise MoATrainError(f"{n} worker(s) failed: {reason} (full output: {log_path})")


def join_run(cfg: Any, run_dir: Any, shared_dir: bool) -> dict[str, Any]:
    """``launcher.machine_rank > 0``: start this machine's workers of a run that machine 0 owns.

    Machine 0 claims the run dir (on storage every machine sees) and its global rank 0 writes everything
    in it; this machine writes nothing there: its workers read the config from a private copy and its
    launcher log goes beside that copy. The run dir must be named the same on every machine
    (``hydra.run.dir=...``), since a timestamped default differs between machines.
    """
    if not shared_dir:
        raise MoATrainError(
            "launcher.machine_rank > 0 needs the run dir of machine 0: pass the same hydra.run.dir=<shared path> "
            "on every machine"
        )
    private = Path(tempfile.mkdtemp(prefix=f"moa-machine{int(cfg.launcher.machine_rank)}-"))
    config_path = private / CONFIG_NAME
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    launch_workers(cfg, Path(run_dir), config_path, log_dir=private)
    return read_summary(Path(run_dir))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: SLURM via submitit
# torch-elastic and Python tracebacks: kept in workers.log, not echoed
NOISE = re.compile(
    r"^(Traceback|\s|[EWI]\d{4} |=+$|\[rank\d|Root Cause|Failures|torch\.distributed|\w[\w.]*(Error|Exception)\b)"
)
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*: ")


def _forward(proc: subprocess.Popen) -> Any:
    """Pass a stop signal on as SIGTERM: the torch-elastic agent forwards SIGTERM to the workers, but
    SIGUSR1 would end the agent itself and orphan them."""

    def handler(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    return handler


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cuda_available() -> bool:
    # deferred: torch is heavy; only the launcher's GPU count needs it
    import torch

    return torch.cuda.is_available()


def worker_main(argv: list[str] | None = None) -> Any:
    """One worker: ``python -m moa_train.cli.launch <run dir> [<config file>]`` (started by accelerate)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        raise SystemExit("usage: python -m moa_train.cli.launch <run dir> [<config file>]")
    run_dir = Path(args[0])
    try:
        cfg = OmegaConf.load(args[1] if len(args) == 2 else run_dir / "config.yaml")
        from moa_train.train.recipe import train  # after the config: a bad path fails before torch loads

        return train(cfg, run_dir, expected_world_size=int(cfg.launcher.num_processes))
    except Preempted:
        sys.exit(EXIT_PREEMPTED)  # the launching process prints the resume hint
    except (Exception, KeyboardInterrupt) as exc:
        report(exc)


if __name__ == "__main__":
    worker_main()
