"""launcher=fsdp (FSDP2 applied by moa_train) and several machines, on CPU processes (gloo).

Default suite: the sharding proof (DTensor shards, ~1/2 of the base per rank, gradients equal to an
unsharded reference while the two ranks route to different experts) and the one-line errors for bad
launcher values. Slow: a 2-process `moa-train` run equal to 1 process, the router x
gradient-checkpointing matrix against 1 process and DDP, kill -9 + resume, two "machines" on localhost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import OFFLINE_ENV, TINY, console_script, run_cli, train_in_process

WORKER = Path(__file__).with_name("fsdp_worker.py")
COMMON = TINY + [
    "final_eval.enabled=false",
    "trainer.max_steps=4",
    "trainer.micro_batch_size=2",
    "trainer.effective_batch_size=4",
    "trainer.save_every_steps=2",
]
FSDP2 = ["launcher=fsdp", "launcher.num_processes=2"]
ADAPTERS = "final/adapter_model.safetensors"


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / ADAPTERS))


def _assert_equal_adapters(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = _adapters(a), _adapters(b)
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=atol, msg=name)


def test_fsdp_shards_the_base_and_matches_the_reference_gradient(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(tmp_path),
        ],
        env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,  # a rank that waits on a collective the other never joins would hang here
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["base_not_sharded"] == [], "base weights replicated instead of DTensor Shard(0)"
        assert rank["adapters_not_sharded"] == []
        # about half of the base per rank (dim-0 chunks of uneven sizes differ by at most a row)
        assert abs(rank["base_local"] - rank["base_total"] / 2) < 0.01 * rank["base_total"]
        assert rank["grads_compared"] >= 30 and rank["grad_gap"] < 1e-6
    assert ranks[0]["base_local"] + ranks[1]["base_local"] == ranks[0]["base_total"]
    # the data really routes differently: some expert runs on one rank's tokens and not the other's
    assert ranks[0]["experts_used"] != ranks[1]["experts_used"]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path: Path) -> None:
    fsdp = tmp_path / "fsdp"
    result = run_cli("moa-train", *COMMON, *FSDP2, f"hydra.run.dir={fsdp}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((fsdp / "summary.json").read_text())
    one = train_in_process(tmp_path / "one", COMMON)
    assert summary["parallelism"] == "fsdp2" and one["parallelism"] == "none"
    assert summary["world_size"] == 2
    # the base elements one rank holds: half of what one process holds
    assert (
        abs(summary["base_params_per_rank"] - one["base_params_per_rank"] / 2)
        < 0.01 * one["base_params_per_rank"]
    )
    _assert_equal_adapters(fsdp, tmp_path / "one")
    # the mid-run checkpoint holds whole (gathered) optimizer moments, in the 1-process layout
    moments = load_file(str(fsdp / "checkpoints" / "step-2" / "optimizer.safetensors"))
    reference = load_file(str(tmp_path / "one" / "checkpoints" / "step-2" / "optimizer.safetensors"))
    assert moments.keys() == reference.keys()
    for key in moments:
        assert moments[key].shape == reference[key].shape, key


ROUTERS = {
    "soft": [],
    "sparse_learned_threshold": ["experts=moa_sparse", "router=sparse", "moa.router.threshold_grad=ste"],
    "topk_molora": ["experts=molora_topk", "router=none"],
    "instance": ["router=instance"],
}


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_fsdp_equals_one_process_and_ddp(tmp_path: Path, router: str, checkpointing: bool) -> None:
    args = [*COMMON, *ROUTERS[router], f"trainer.gradient_checkpointing={str(checkpointing).lower()}"]
    for name, launcher in (("fsdp", FSDP2), ("ddp", ["launcher=accelerate", "launcher.num_processes=2"])):
        result = run_cli("moa-train", *args, *launcher, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
    train_in_process(tmp_path / "one", args)
    _assert_equal_adapters(tmp_path / "fsdp", tmp_path / "one")
    _assert_equal_adapters(tmp_path / "fsdp", tmp_path / "ddp")


RESUME = [*TINY, "final_eval.enabled=false", "trainer.max_steps=12", "trainer.save_every_steps=4", *FSDP2]


@pytest.mark.slow
def test_fsdp_kill9_then_resume_is_bit_identical(tmp_path: Path) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_cli("moa-train", *RESUME, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        [console_script("moa-train"), *RESUME, f"hydra.run.dir={victim}"],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (victim / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.02)
    # torchrun starts each worker in its own session: kill -9 the launcher and every worker, as a lost node
    tree = psutil.Process(proc.pid)
    for process in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (victim / "final").exists(), "killed too late: the run had already finished"
    resumed = run_cli("moa-train", f"resume={victim}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (victim / ADAPTERS).read_bytes() == (reference / ADAPTERS).read_bytes()


@pytest.mark.slow
def test_two_machines_on_localhost_equal_one_process(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    machine = [
        *COMMON,
        *FSDP2,
        "launcher.num_machines=2",
        "launcher.main_process_ip=127.0.0.1",
        "launcher.main_process_port=29533",
        f"hydra.run.dir={shared}",
    ]
    env = {**os.environ, **OFFLINE_ENV}
    second = subprocess.Popen(
        [console_script("moa-train"), *machine, "launcher.machine_rank=1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = run_cli("moa-train", *machine, "launcher.machine_rank=0", cwd=tmp_path)
    output, _ = second.communicate(timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, output[-3000:]
    assert json.loads((shared / "summary.json").read_text())["world_size"] == 2
    # machine 1 wrote nothing of its own into the shared run dir
    assert not list(shared.glob("**/*machine*"))
    train_in_process(tmp_path / "one", COMMON)
    _assert_equal_adapters(shared, tmp_path / "one")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launcher=fsdp", "launcher.num_processes=0"], "launcher.num_processes=0"),
        (["launcher=fsdp", "launcher.reshard_after_forward=maybe"], "launcher.reshard_after_forward"),
        (["launcher=fsdp", "model.quantization=int8"], "model.quantization=int8 cannot be sharded"),
        (["launcher=fsdp", "launcher.cpu_offload=true"], "launcher.cpu_offload=true"),
        (["launcher=fsdp", "launcher.num_machines=2"], "launcher.main_process_ip"),
        (["launcher=accelerate", "launcher.num_machines=2", "launcher.machine_rank=2"], "machine_rank=2"),
        (["launcher=fsdp", "launcher.num_processes=3", "launcher.num_machines=2"], "multiple of"),
    ],
)
def test_bad_launcher_values_fail_before_any_process(compose, overrides: list[str], message: str) -> None:
    from moa_train.cli.validate import validate
    from moa_train.errors import MoATrainError

    cfg = compose([*TINY, *overrides])
    with pytest.raises(MoATrainError, match=re.escape(message)):
        validate(cfg, "train")


def test_a_bad_launcher_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "moa-train",
        *TINY,
        "launcher=fsdp",
        "launcher.num_processes=two",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "num_processes" in lines[0], result.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()
