"""Exact resume: a run killed with SIGKILL and resumed ends with the same adapters, bit for bit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import OFFLINE_ENV, TINY, console_script, run_cli
from moa_train.train.loggers import read_metrics

ARGS = TINY + [
    "final_eval.enabled=false",
    "trainer.max_steps=16",
    "trainer.save_every_steps=4",
    "trainer.keep_last=2",
    "trainer.log_every_steps=1",
]


def _kill_after_first_checkpoint(run_dir: Path, cwd: Path) -> None:
    proc = subprocess.Popen(
        [console_script("moa-train"), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists(), "killed too late: the run had already finished"


def test_kill9_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_cli("moa-train", *ARGS, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log_text = (reference / "train.log").read_text()
    assert "training 16 steps" in log_text
    # no terminal: a plain progress line per log step instead of a redrawn bar
    assert re.search(r"step 16/16  loss \d+\.\d{4}  lr \S+  \d+ tok/s  ETA 0s", log_text)
    assert "\r" not in done.stderr

    _kill_after_first_checkpoint(victim, tmp_path)
    killed_at = max(r["step"] for r in read_metrics(victim) if "train/loss" in r)
    assert killed_at < 16

    resumed = run_cli("moa-train", f"resume={victim}", cwd=tmp_path)  # the run dir: its newest checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = "final/adapter_model.safetensors"
    assert (victim / final).read_bytes() == (reference / final).read_bytes()
    state = json.loads((victim / "final" / "trainer_state.json").read_text())
    assert state["step"] == 16
    # the resumed session logged the steps after its checkpoint with the reference's values
    reference_loss = {r["step"]: r["train/loss"] for r in read_metrics(reference) if "train/loss" in r}
    resumed_loss = {r["step"]: r["train/loss"] for r in read_metrics(victim) if "train/loss" in r}
    assert resumed_loss[16] == reference_loss[16]
    assert not list((victim / "checkpoints").glob(".tmp-*")), "a partial checkpoint was left behind"


def test_resume_refuses_to_switch_a_config_group(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\nmoa: {router: {kind: linear}}\n")
    (run / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    result = run_cli("moa-train", f"resume={run}", "router=sparse", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: resume keeps the run's config")
    nothing = run_cli("moa-train", f"resume={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert nothing.returncode == 2 and "error: resume=" in nothing.stderr
