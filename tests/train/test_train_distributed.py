"""launcher=accelerate: 2 CPU processes (gloo) train like 1 process with the same global batch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_cli, train_in_process

COMMON = TINY + [
    "final_eval.enabled=false",
    "trainer.max_steps=4",
    "trainer.micro_batch_size=2",
    "trainer.effective_batch_size=4",
    "trainer.save_every_steps=2",
]


def test_two_cpu_processes_equal_one(tmp_path: Path) -> None:
    two = tmp_path / "two"
    result = run_cli(
        "moa-train",
        *COMMON,
        "launcher=accelerate",
        "launcher.num_processes=2",
        f"hydra.run.dir={two}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr  # the gloo teardown crash
    state = json.loads((two / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    digests = state["extra"]["param_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks ended with different adapters"
    assert {p.name for p in (two / "final").glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors", "rng-rank1.safetensors",
    }  # fmt: skip

    train_in_process(tmp_path / "one", COMMON)  # 1 process: micro-batch 2 x 2 accumulation
    a = load_file(str(two / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_accelerate_launcher_inside_a_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        *COMMON,
        "launcher=accelerate",
        "launcher.num_processes=2",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli("moa-train", "-m", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["status"], r["world_size"]) for r in rows] == [
        ("0", "completed", "2"),
        ("1", "completed", "2"),
    ]
