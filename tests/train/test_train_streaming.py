"""data.streaming: a streamed run resumed from a checkpoint (or after kill -9) ends bit for bit like an
uninterrupted one, reading on from the exact record; the options streaming cannot go with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, TINY, console_script, run_cli, train_in_process
from moa_train.errors import MoATrainError


def _stream_args(tmp_path: Path) -> list[str]:
    data = tmp_path / "stream.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"instruction": f"What is {i} plus {i % 7}?", "output": f"{i} + {i % 7} = {i + i % 7}"}
            )
            + "\n"
            for i in range(22)  # 22 records, 4 per step: the stream wraps into its second epoch at step 6
        )
    )
    return TINY + [
        "data=custom", f"data.train_path={data}", "data.streaming=true", "data.answer_type=numeric",
        "trainer.max_steps=8", "trainer.save_every_steps=2", "trainer.keep_last=10", "final_eval.enabled=false",
    ]  # fmt: skip


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_streamed_run_resumes_at_the_exact_record(tmp_path: Path) -> None:
    args = _stream_args(tmp_path)
    train_in_process(tmp_path / "full", args)
    positions = {
        s: _state(tmp_path / "full" / "checkpoints" / f"step-{s}")["extra"]["stream"] for s in (2, 6)
    }
    assert positions[2] == {"epoch": 0, "file": 0, "offset": positions[2]["offset"], "records": 8}
    assert positions[6]["epoch"] == 1 and positions[6]["records"] == 2  # 24 records read: 22 + 2
    train_in_process(tmp_path / "resumed", args + [f"resume={tmp_path / 'full' / 'checkpoints' / 'step-2'}"])
    full = (tmp_path / "full" / "final" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "final" / "adapter_model.safetensors").read_bytes() == full
    assert (
        _state(tmp_path / "resumed" / "final")["extra"]["stream"]
        == _state(tmp_path / "full" / "final")["extra"]["stream"]
    )


@pytest.mark.slow  # three CLI runs, one killed with SIGKILL
def test_streamed_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path: Path) -> None:
    args = _stream_args(tmp_path)
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_cli("moa-train", *args, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        [console_script("moa-train"), *args, f"hydra.run.dir={victim}"],
        cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (victim / "checkpoints" / "step-4" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended (or hung) before step 4"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (victim / "final").exists(), "killed too late: the run had already finished"
    resumed = run_cli("moa-train", f"resume={victim}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    name = "adapter_model.safetensors"
    assert (victim / "final" / name).read_bytes() == (reference / "final" / name).read_bytes()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["data.packing=true"], "does not pack rows yet"),
        (["data.val_size=4"], "use data.val_path"),
        (["scheduler.warmup_epochs=1.0"], "scheduler.warmup_epochs=null"),
        (["trainer.max_steps=null"], "needs trainer.max_steps"),
        (["data.source=hub"], "reads local JSONL files"),
    ],
)
def test_streaming_refuses_what_it_cannot_do(extra: list[str], needle: str, tmp_path: Path, compose) -> None:
    from moa_train.train.validation import check_settings

    with pytest.raises(MoATrainError, match=needle) as err:
        check_settings(compose(_stream_args(tmp_path) + extra))
    assert "\n" not in str(err.value)


def test_stream_file_must_be_jsonl(tmp_path: Path) -> None:
    from moa_train.data import load_splits

    with pytest.raises(MoATrainError, match="data file not found"):
        load_splits(
            {"name": "s", "source": "json", "streaming": True, "train_path": str(tmp_path / "none.jsonl")}
        )
