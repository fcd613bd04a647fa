"""What is never lost and never executed: unique run dirs under concurrent starts, a stop signal saves
the step and the run resumes bit for bit, kill -9 during pruning, a full disk, no code from a checkpoint,
resume as people type it, the heat-map at the end, the bounded W&B start."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_bad_inputs import invoke, snapshot

from conftest import OFFLINE_ENV, console_script, run_cli
from moa_train import rundir
from moa_train.cli.main import eval_main, train_main
from moa_train.errors import EXIT_PREEMPTED
from moa_train.report.jobs import read_job
from moa_train.train import checkpoint

ARGS = [
    "experiment=tiny",
    "final_eval.enabled=false",
    "trainer.max_steps=6",
    "trainer.save_every_steps=100",  # only the stop and the end save
    "trainer.log_every_steps=1",
    "trainer.heatmap_every_steps=null",
]
WEIGHTS = "final/adapter_model.safetensors"


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- run dirs ---------------------------------------------------------------------------------


def test_concurrent_starts_get_distinct_run_dirs(tmp_path: Path) -> None:
    """Eight processes claim the same timestamped folder at the same moment: eight folders."""
    code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from moa_train import rundir
        start = float(sys.argv[2])
        while time.time() < start:
            pass
        print(rundir.claim(Path(sys.argv[1]), sys.argv[3], auto=True, overwrite=False))
        """
    )
    base = tmp_path / "runs" / "tiny" / "2026-01-01_00-00-00"
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(base), str(start), f"id: {i}\n"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    claimed = [Path(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(claimed)) == 8
    contents = sorted((d / "config.yaml").read_text() for d in claimed)
    assert contents == sorted(f"id: {i}\n" for i in range(8))  # each folder holds its own config


def test_two_runs_in_the_same_second_keep_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console entry point twice with the clock frozen: runs/tiny/<time>/ and runs/tiny/<time>-2/."""
    import datetime as real

    import hydra.core.utils

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz: object = None) -> real.datetime:
            return real.datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    for seed in (0, 1):
        code, output = invoke(train_main, [*ARGS, "trainer.max_steps=1", f"seed={seed}"], tmp_path)
        assert code == 0, output[-2000:]
    first, second = tmp_path / "runs/tiny/2026-01-01_12-00-00", tmp_path / "runs/tiny/2026-01-01_12-00-00-2"
    assert (
        "seed: 0" in (first / "config.yaml").read_text() and "seed: 1" in (second / "config.yaml").read_text()
    )
    assert (first / "final").is_dir() and (second / "final").is_dir()


def test_a_run_dir_holding_a_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*ARGS, "trainer.max_steps=1", f"hydra.run.dir={run}"]
    assert invoke(train_main, args, tmp_path)[0] == 0
    before = snapshot(run)
    code, output = invoke(train_main, args, tmp_path)
    assert code == 2 and "already holds a run" in _errors(output)[0] and snapshot(run) == before
    code, output = invoke(train_main, [*args, "overwrite=true", "seed=1"], tmp_path)
    assert code == 0, output[-2000:]
    assert "seed: 1" in (run / "config.yaml").read_text()


def _unfinished_run(tmp_path: Path, *extra: str) -> list[str]:
    """Train a 2-step run with its step-2 checkpoint; return its arguments."""
    args = [*ARGS, "trainer.max_steps=2", "trainer.save_every_steps=2", *extra]
    code, output = invoke(train_main, args, tmp_path)
    assert code == 0, output[-2000:]
    return args


def test_a_run_in_use_is_neither_resumed_nor_cleared(tmp_path: Path) -> None:
    """While a process trains a run (holds its lock), resume= and overwrite=true of that run dir are
    refused in one line naming the process, and nothing in the folder changes; afterwards both work."""
    run = tmp_path / "run"
    args = _unfinished_run(tmp_path, f"hydra.run.dir={run}")
    shutil.rmtree(run / "final")  # as a kill after the step-2 checkpoint leaves it
    (run / "summary.json").unlink()
    with rundir.hold(run):  # this test is the live trainer
        before = snapshot(run)
        for argv in ([f"resume={run}"], [*args, "overwrite=true", "seed=1"]):
            code, output = invoke(train_main, argv, tmp_path)
            assert code == 2 and len(_errors(output)) == 1, output[-2000:]
            assert f"is in use by another process (pid {os.getpid()} on " in _errors(output)[0]
            assert snapshot(run) == before
    # the holder ended: it resumes, and as its last step is saved, straight to final/ and the summary
    code, output = invoke(train_main, [f"resume={run}"], tmp_path)
    assert code == 0, output[-2000:]
    assert "training ended at step 2 before; writing final/" in output
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert rundir.read_summary(run)["status"] == "completed"


def test_the_run_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom moa_train import rundir\n"
         "with rundir.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert rundir.holder(tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()
    try:
        assert holder.stdout.readline().strip() == "held"
        assert rundir.holder(tmp_path).startswith(f"pid {holder.pid} on ")  # what moa-report calls running
        with pytest.raises(rundir.RunBusy, match=f"pid {holder.pid} on "), rundir.hold(tmp_path):
            pass
        with pytest.raises(rundir.RunBusy), rundir.hold(tmp_path, wait_s=1.5):  # waits, then gives up
            pass
    finally:
        holder.kill()  # kill -9: no clean-up code runs, the kernel drops the lock
        holder.wait(timeout=60)
    assert rundir.holder(tmp_path) is None
    with rundir.hold(tmp_path):  # free again, and the file still names the holder
        assert (tmp_path / rundir.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")


def test_a_report_probing_the_lock_never_makes_a_starting_job_give_up(tmp_path: Path) -> None:
    """holder() takes a shared lock for an instant; a job starting in that instant waits it out."""
    import fcntl
    import threading

    probe = os.open(tmp_path / rundir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH)  # a probe caught mid-way (held far longer than a real one)
    threading.Timer(0.5, os.close, (probe,)).start()
    with rundir.hold(tmp_path):  # not RunBusy
        assert rundir.holder(tmp_path) is not None  # this process holds it now


def test_a_sweep_started_again_skips_the_job_another_process_is_training(tmp_path: Path) -> None:
    """Two invocations of one sweep: the job the first one is still training is skipped by the second,
    its folder untouched (not resumed from its last checkpoint under the first process)."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *ARGS,
        "trainer.max_steps=2",
        "trainer.save_every_steps=2",
        "seed=0",
        f"hydra.sweep.dir={sweep}",
    ]
    code, output = invoke(train_main, args, tmp_path)
    assert code == 0, output[-2000:]
    job = sweep / "0"
    shutil.rmtree(job / "final")  # as if still training after its step-2 checkpoint
    (job / "summary.json").unlink()
    with rundir.hold(job):
        before = snapshot(job)
        code, output = invoke(train_main, args, tmp_path)
        assert code == 0, output[-2000:]
        assert "is in use by another process" in output and "skipped here" in output
        assert snapshot(job) == before
        assert not (job / "error.txt").exists()
        # the sweep table and moa-report tell the job in training from one stopped without a summary
        (row,) = csv.DictReader((sweep / "summary.csv").read_text().splitlines())
        assert row["status"] == "running"
        assert read_job(job, sweep).status == "running" and "in progress (pid" in read_job(job, sweep).reason
    assert read_job(job, sweep).status == "incomplete"
    code, output = invoke(train_main, args, tmp_path)  # the first invocation ended: now it resumes
    assert code == 0, output[-2000:]
    assert (job / "final").is_dir() and "resuming from" in output


# ---- preemption and resume --------------------------------------------------------------------


def _signal_during_step(monkeypatch: pytest.MonkeyPatch, signum: int, at_call: int) -> None:
    """Deliver ``signum`` to this process in the middle of an optimizer step (a micro-batch)."""
    import moa_train.train.recipe

    calls = {"n": 0}
    real_add = moa_train.train.recipe.Meter.add

    def add(self, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        real_add(self, *args)

    monkeypatch.setattr(moa_train.train.recipe.Meter, "add", add)


@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
)
def test_stop_signal_saves_the_step_and_resume_is_bit_identical(
    signum: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert invoke(train_main, [*ARGS, f"hydra.run.dir={reference}"], tmp_path)[0] == 0

    with monkeypatch.context() as patch:
        _signal_during_step(patch, signum, at_call=5)  # step 3 of 6 (2 micro-batches per step)
        code, output = invoke(train_main, [*ARGS, f"hydra.run.dir={victim}"], tmp_path)
    assert code == EXIT_PREEMPTED, output[-2000:]
    assert f"resume with: moa-train resume={victim}" in output and not _errors(output)
    state = json.loads((victim / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["step"] == 3  # the step that was running finished, then it was saved
    assert json.loads((victim / "summary.json").read_text())["status"] == "preempted"
    assert not (victim / "final").exists()

    # resume as people type it: the same command with resume= appended
    config = (victim / "config.yaml").read_bytes()
    code, output = invoke(train_main, [*ARGS, f"hydra.run.dir={victim}", f"resume={victim}"], tmp_path)
    assert code == 0, output[-2000:]
    assert (victim / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    assert (victim / "config.yaml").read_bytes() == config  # never rewritten by a resume
    assert list((victim / "resumes").glob("*/overrides.yaml"))  # the resume's overrides, beside it


def test_resume_extends_a_finished_run_with_max_steps(tmp_path: Path) -> None:
    from moa_train.train.loggers import read_metrics

    run = tmp_path / "run"
    assert invoke(train_main, [*ARGS, "trainer.max_steps=4", f"hydra.run.dir={run}"], tmp_path)[0] == 0
    config = (run / "config.yaml").read_bytes()
    code, output = invoke(train_main, [f"resume={run}"], tmp_path)
    assert code == 2 and "already finished at step 4" in _errors(output)[0]
    code, output = invoke(train_main, [f"resume={run}", "trainer.max_steps=6", "logger=none"], tmp_path)
    assert code == 0, output[-2000:]
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == 6
    assert (run / "config.yaml").read_bytes() == config
    lr = {r["step"]: r["train/lr"] for r in read_metrics(run) if "train/lr" in r}
    assert lr[5] > 0  # the cosine re-planned over 6 steps, not stuck at min_lr after the old 4


@pytest.mark.slow
def test_sigterm_from_outside_then_resume_matches(tmp_path: Path) -> None:
    """The console script under a real SIGTERM (what SLURM and Kubernetes send)."""
    args = [*ARGS, "trainer.max_steps=120", "trainer.log_every_steps=1"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_cli("moa-train", *args, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(
        [console_script("moa-train"), *args, f"hydra.run.dir={victim}"],
        cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while (
        not (victim / "metrics.jsonl").is_file()
        or len((victim / "metrics.jsonl").read_text().splitlines()) < 5
    ):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "resume with: moa-train resume=" in stderr and "Traceback" not in stderr
    resumed = run_cli("moa-train", f"resume={victim}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (victim / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()


# ---- pruning, full disk ------------------------------------------------------------------------


def _fake_checkpoints(run: Path, steps: list[int]) -> None:
    import torch
    from safetensors.torch import save_file

    (run / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("name: x\n")
    for step in steps:
        d = run / "checkpoints" / f"step-{step}"
        d.mkdir(parents=True)
        for name in ("adapter_model", "optimizer", "rng-rank0"):
            save_file({"t": torch.zeros(4)}, str(d / f"{name}.safetensors"))
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))


PRUNE_AND_DIE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    from moa_train.train import checkpoint
    run, where = Path(sys.argv[1]), sys.argv[2]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "rename":  # after the marker is gone, before the folder leaves its step-N name
        os.rename = die
    else:  # halfway through deleting the files
        real = Path.unlink
        def unlink(self, *a, **k):
            if self.suffix == ".safetensors":
                real(self)
                die()
            return real(self, *a, **k)
        shutil.rmtree = lambda path, **k: [unlink(p) for p in sorted(Path(path).iterdir())]
    checkpoint.prune(run / "checkpoints" / "step-1")
    """
)


@pytest.mark.parametrize("where", ["rename", "rmtree"])
def test_kill9_during_pruning_never_leaves_a_checkpoint_that_looks_complete(
    tmp_path: Path, where: str
) -> None:
    run = tmp_path / "run"
    _fake_checkpoints(run, [1, 2, 3])
    proc = subprocess.run(
        [sys.executable, "-c", PRUNE_AND_DIE, str(run), where], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    for d in (run / "checkpoints").iterdir():
        if (d / checkpoint.STATE_NAME).is_file():  # looks complete -> is complete
            assert all(
                (d / f"{n}.safetensors").is_file() for n in ("adapter_model", "optimizer", "rng-rank0")
            )
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-2", "step-3"]
    assert rundir.resolve_resume(run).checkpoint.name == "step-3"


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing step-4 (simulated; the tmpfs test below does it for real where it can)."""
    import errno

    real = checkpoint.save_file

    def save_file(tensors: object, path: str, *args: object, **kwargs: object) -> None:
        if "step-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    code, output = invoke(train_main, [*ARGS, "trainer.save_every_steps=2", f"hydra.run.dir={run}"], tmp_path)
    errors = _errors(output)
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output[-2000:]
    assert "step-4" in errors[0] and "No space left on device" in errors[0] and "step-2 is kept" in errors[0]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the temporary folder was left behind"
    assert [p.name for p in checkpoint.step_checkpoints(run)] == ["step-2"]


def _try_tmpfs(mount: Path, size: str) -> bool:
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    return result.returncode == 0


def test_full_tmpfs_during_a_save(tmp_path: Path) -> None:
    """A real full disk: a small tmpfs holds one checkpoint, the second does not fit."""
    import torch

    from moa_train import MoAConfig, get_moa_model
    from moa_train.errors import MoATrainError
    from tiny_models import tiny_model

    model = get_moa_model(tiny_model("llama"), MoAConfig.from_dict({"lora_rank": 16}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    class One:
        process_index, num_processes, is_main_process = 0, 1, True

        def wait_for_everyone(self) -> None:
            pass

    save = dict(accelerator=One(), model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                extra_config={}, keep_last=None)  # fmt: skip
    probe = checkpoint.save_checkpoint(
        tmp_path / "probe" / "step-1", state=checkpoint.TrainState(step=1), **save
    )
    size = sum(p.stat().st_size for p in probe.iterdir())
    mount = tmp_path / "disk"
    if not _try_tmpfs(mount, f"{(size * 3 // 2) // 1024 + 8}k"):  # room for one checkpoint, not two
        pytest.skip("tmpfs cannot be mounted here; the simulated ENOSPC test covers the path")
    try:
        checkpoint.save_checkpoint(
            mount / "checkpoints" / "step-1", state=checkpoint.TrainState(step=1), **save
        )
        with pytest.raises(MoATrainError, match="No space left on device") as info:
            for step in range(2, 20):
                checkpoint.save_checkpoint(
                    mount / "checkpoints" / f"step-{step}", state=checkpoint.TrainState(step=step), **save
                )
        assert "is kept" in str(info.value)
        assert not list((mount / "checkpoints").glob(".tmp-*"))
        assert checkpoint.step_checkpoints(mount)[0].name == "step-1"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---- no code from files -----------------------------------------------------------------------


def _code_model(folder: Path, sentinel: Path) -> None:
    """A model folder whose config asks for custom code that, if ever imported, writes ``sentinel``."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
            }
        )
    )
    (folder / "configuration_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")


def test_no_code_runs_from_a_checkpoint_or_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke(train_main, [*ARGS, "trainer.max_steps=2", "trainer.save_every_steps=1", f"hydra.run.dir={run}"],
                  tmp_path)[0] == 0  # fmt: skip
    sentinel, evil = tmp_path / "code_ran", tmp_path / "evil_model"
    _code_model(evil, sentinel)
    node = {"name": "evil", "source": "hub", "name_or_path": str(evil), "trust_remote_code": True}
    adapter_config = run / "final" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "model": node}))
    code, output = invoke(eval_main, [f"checkpoint={run / 'final'}", "eval=heldout"], tmp_path)
    assert code == 2 and "code loading is never enabled from a saved file" in _errors(output)[0]

    (run / "final").rename(run / "finished")  # make it resumable, with the same model node in config.yaml
    text = (run / "config.yaml").read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    (run / "config.yaml").write_text(text)
    code, output = invoke(train_main, [f"resume={run}"], tmp_path)
    assert code == 2 and "model.trust_remote_code=true" in _errors(output)[0]
    assert not sentinel.exists(), "code from a checkpoint ran"


# ---- telemetry ----------------------------------------------------------------------------------


def test_a_short_run_still_saves_a_heatmap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*ARGS, "trainer.max_steps=2", "trainer.heatmap_every_steps=200", f"hydra.run.dir={run}"]
    assert invoke(train_main, args, tmp_path)[0] == 0
    assert [p.name for p in (run / "router").glob("*.png")] == ["heatmap-step-2.png"]


def test_wandb_online_start_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    from moa_train.train.loggers import WANDB_INIT_TIMEOUT, WandbBackend

    calls = []

    def init(**kwargs: object) -> object:
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise TimeoutError("no network")
        return type("Run", (), {"id": "abc"})()

    monkeypatch.setattr(wandb, "init", init)
    backend = WandbBackend({"mode": "online"}, tmp_path, {}, None)
    assert backend.id == "abc" and WANDB_INIT_TIMEOUT <= 15
    assert calls[0]["settings"].init_timeout == WANDB_INIT_TIMEOUT and calls[1]["mode"] == "offline"


@pytest.mark.slow
def test_a_worker_failure_is_one_line_from_the_launcher(tmp_path: Path) -> None:
    """Workers fail after loading (a 1-process checkpoint resumed on 2): one line, logs in workers.log."""
    run = tmp_path / "run"
    assert invoke(train_main, [*ARGS, "trainer.max_steps=2", "trainer.save_every_steps=1", f"hydra.run.dir={run}"],
                  tmp_path)[0] == 0  # fmt: skip
    (run / "final").rename(run / "done")  # resumable from checkpoints/step-2
    before = snapshot(run)
    result = run_cli(
        "moa-train", f"resume={run}", "launcher=accelerate", "launcher.num_processes=2", cwd=tmp_path
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "worker(s) failed" in errors[0] and "launcher.num_processes=1" in errors[0], errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith(("workers.log", "train.log"))} == {
        k: v for k, v in before.items() if not k.startswith("train.log")
    }


@pytest.mark.slow
def test_sigterm_under_ddp_saves_one_step_for_all_ranks(tmp_path: Path) -> None:
    """2 DDP workers: SIGTERM to the launching process reaches the workers, both ranks stop after the
    same step and save it, and the run resumes from there."""
    run = tmp_path / "run"
    args = [
        *ARGS,
        "trainer.max_steps=400",
        "launcher=accelerate",
        "launcher.num_processes=2",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(
        [console_script("moa-train"), *args], cwd=tmp_path, env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "resume with: moa-train resume=" in stderr and "Traceback" not in stderr
    (saved,) = checkpoint.step_checkpoints(run)
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert (saved / "rng-rank0.safetensors").is_file() and (saved / "rng-rank1.safetensors").is_file()
    resumed = run_cli(
        "moa-train", f"resume={run}", f"trainer.max_steps={step + 1}", cwd=tmp_path, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == step + 1
