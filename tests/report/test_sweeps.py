"""Sweeps on Hydra's launchers and sweepers: joblib, submitit (the SLURM code path), Optuna; re-entering a
sweep's job folders (skip finished, resume exactly, refuse another config); failed jobs reported."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import TINY, compose_config, run_cli

LONG = 1800  # seconds: a sweep starts several processes, slow on a busy machine
ARGS = [*TINY, "final_eval.enabled=false", "trainer.max_steps=2", "trainer.save_every_steps=null"]


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # worker processes each import torch: ~30 s on an idle 2-core machine
@pytest.mark.parametrize(
    "launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]]
)
def test_parallel_launchers_run_each_job_in_its_own_folder(tmp_path: Path, launcher: list[str]) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli(
        "moa-train",
        "-m",
        *ARGS,
        "seed=0,1",
        *launcher,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=LONG,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = _jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
        assert (job / "final" / "adapter_model.safetensors").is_file() and (job / "train.log").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    if "submitit" in launcher[0]:  # submitit's own logs, one folder per job: a killed job's last words
        assert len([p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]) == 2
    report = run_cli("moa-report", str(sweep), "--no-plot", cwd=tmp_path, timeout=LONG)
    assert report.returncode == 0, report.stderr
    assert "2 jobs, 2 completed" in (sweep / "report.md").read_text()


@pytest.mark.slow  # ~95 s: three trials, each a full tiny training (make test-slow)
def test_optuna_sweep_writes_the_best_lr_and_moa_report_lists_the_trials(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # 6 steps without warmup: each proposed lr leaves its own final training loss
    done = run_cli("moa-train", "-m", *ARGS, "trainer.max_steps=6", "scheduler.warmup_steps=0", "sweep=lr_search",
                   "objective=train/loss", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=LONG)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    trials = []  # (train/loss the job wrote, the lr it trained with)
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        lr = yaml.safe_load((job / "config.yaml").read_text())["optimizer"]["lr"]
        trials.append((summary["train/loss"], lr))
    assert len({lr for _, lr in trials}) == 3 and len({loss for loss, _ in trials}) == 3
    best_loss, best_lr = min(trials)
    assert results["best_value"] == pytest.approx(best_loss)
    assert float(results["best_params"]["optimizer.lr"]) == pytest.approx(best_lr)
    report = run_cli("moa-report", str(sweep), "--no-plot", cwd=tmp_path, timeout=LONG)
    assert report.returncode == 0, report.stderr
    text = (sweep / "report.md").read_text()
    assert (
        "## Optuna study" in text
        and "Best parameters" in text
        and f"optimizer.lr={results['best_params']['optimizer.lr']}" in text
    )
    rows = list(csv.DictReader((sweep / "report_trials.csv").open()))
    assert len(rows) == 3 and {float(r["objective"]) for r in rows} == {loss for loss, _ in trials}


def test_optuna_without_an_objective_is_refused_before_training(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli("moa-train", "-m", *ARGS, "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=1",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=LONG)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: hydra/sweeper=optuna needs objective=")
    assert not sweep.exists()  # refused before the study started: no trial, no folder


@pytest.mark.slow  # worker processes each import torch: ~30 s on an idle 2-core machine
def test_a_failed_job_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [a for a in ARGS if not a.startswith("trainer.max_steps=")]
    done = run_cli("moa-train", "-m", *args, "trainer.max_steps=2,-3", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=LONG)  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == "error: trainer.max_steps=-3 is invalid: expected an integer >= 1 or null"
    )
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert "trainer.max_steps=-3 is invalid" in (sweep / "1" / "error.txt").read_text()
    report = run_cli("moa-report", str(sweep), "--no-plot", cwd=tmp_path, timeout=LONG)
    assert report.returncode == 0, report.stderr
    failed = (
        (sweep / "report.md")
        .read_text()
        .split("## Failed, running or incomplete jobs (1)")[1]
        .split("## Jobs")[0]
    )
    assert "trainer.max_steps=-3 is invalid" in failed


@pytest.mark.slow  # three sweeps of two tiny jobs
def test_running_a_sweep_again_skips_finished_jobs_and_resumes_stopped_ones_exactly(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY, "final_eval.enabled=false", "trainer.max_steps=4", "trainer.save_every_steps=2",
            "seed=0,1", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = run_cli("moa-train", "-m", *args, cwd=tmp_path, timeout=LONG)
    assert done.returncode == 0, done.stderr[-3000:]
    adapters = {j: _digest(sweep / j / "final" / "adapter_model.safetensors") for j in ("0", "1")}
    summary_1 = (sweep / "1" / "summary.json").stat().st_mtime_ns
    # job 0 as if killed after its step-2 checkpoint: no step-4, no final/, no summary
    shutil.rmtree(sweep / "0" / "final")
    shutil.rmtree(sweep / "0" / "checkpoints" / "step-4", ignore_errors=True)
    (sweep / "0" / "summary.json").unlink()
    again = run_cli("moa-train", "-m", *args, cwd=tmp_path, timeout=LONG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in (sweep / "0" / "train.log").read_text()
    assert _digest(sweep / "0" / "final" / "adapter_model.safetensors") == adapters["0"]  # bit-identical
    assert (sweep / "1" / "summary.json").stat().st_mtime_ns == summary_1  # finished: skipped
    # another config in the same folders is refused, and nothing of the existing runs is touched
    other = run_cli("moa-train", "-m", *args, "optimizer.lr=5e-4", cwd=tmp_path, timeout=LONG)
    assert (
        other.returncode != 0
        and "already holds a run with another config (optimizer.lr=0.0005 here" in other.stderr
    )
    assert _digest(sweep / "1" / "final" / "adapter_model.safetensors") == adapters["1"]


def test_sweep_presets_compose() -> None:
    job = compose_config(["sweep=leaderboard", "seed=2", "experiment=math_lora", "model=smollm2_135m",
                          "data=arith_mix", "optimizer.lr=3e-4"], hydra=True)  # fmt: skip
    assert job.data.seed == 2 and job.seed == 2  # the seed varies the data order too
    assert job.final_eval.max_records is None and job.final_eval.enabled  # every held-out item
    assert job.trainer.max_steps >= 64 and job.trainer.effective_batch_size >= 16
    params = job.hydra.sweeper.params
    assert str(params.seed) == "0" and len(str(params.experiment).split(",")) == 13  # phase 1: the search
    assert len(str(params["optimizer.lr"]).split(",")) == 4
    assert str(job.hydra.mode).endswith("MULTIRUN")  # one command, no -m
    # phase 2: seeds 1, 2 at the chosen rates, with phase 1's budget key for key
    seeds = compose_config(["sweep=leaderboard_seeds", "seed=2", "experiment=math_lora", "model=smollm2_135m",
                            "data=arith_mix", "optimizer.lr=3e-4"], hydra=True)  # fmt: skip
    assert str(seeds.hydra.sweeper.params.seed) == "1,2" and "optimizer.lr" not in seeds.hydra.sweeper.params
    for key in ("trainer", "scheduler", "final_eval", "data", "objective", "hydra.sweep.dir", "hydra.mode"):
        assert OmegaConf.select(seeds, key) == OmegaConf.select(job, key), key
    lr = compose_config(["sweep=lr_search", *TINY], hydra=True)
    assert lr.objective == "val/loss" and lr.hydra.sweeper.direction == "minimize"
    assert "optuna" in lr.hydra.sweeper._target_
    gpu = compose_config(["sweep=leaderboard_gpu"], hydra=True)
    assert gpu.hydra.sweeper.params.model == "qwen3_1_7b" and gpu.trainer.precision == "bf16"
    assert len(str(gpu.hydra.sweeper.params.seed).split(",")) == 3  # one phase: every rate at 3 seeds
    assert gpu.hydra.sweeper.params.experiment == params.experiment  # the same methods as on CPU
    slurm = compose_config(["hydra/launcher=slurm", *TINY], hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.signal_delay_s > 0 and slurm.max_num_timeout > 0


def test_a_job_folder_continues_only_with_the_same_options() -> None:
    from moa_train.cli.sweep_jobs import _changed_keys

    saved = "seed: 0\ntrainer: {max_steps: 64}\n"
    # an option a newer version added, switched off, is not a change; switched on, it is
    assert _changed_keys(saved, "seed: 0\ntrainer: {max_steps: 64, packing: false}\nobjective: null\n") == []
    assert _changed_keys(saved, "seed: 0\ntrainer: {max_steps: 64}\ndata: {val_size: 200}\n") == [
        ("data.val_size", "<unset>", 200)
    ]
    assert _changed_keys(saved, "seed: 1\ntrainer: {max_steps: 64}\n") == [("seed", 0, 1)]
    assert _changed_keys(saved, saved.replace("seed: 0", "seed: 0\nresume: /x")) == []


def _submitit_job_pids(sweep: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(sweep) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow  # a long tiny job, signalled mid-way
def test_submitit_requeues_a_job_stopped_by_sigusr2_and_it_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    import os
    import signal
    import subprocess
    import time

    from conftest import OFFLINE_ENV, console_script

    sweep = tmp_path / "sweep"
    args = [*TINY, "final_eval.enabled=false", "trainer.max_steps=2000", "trainer.save_every_steps=20",
            "trainer.log_every_steps=20", "seed=0", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen([console_script("moa-train"), "-m", *args], cwd=tmp_path, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 1800  # process start-up dominates on a busy machine
        while not (sweep / "0" / "checkpoints" / "step-20" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
            time.sleep(0.5)
        pids = _submitit_job_pids(sweep)
        assert pids, "no submitit job process found"
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _submitit_job_pids(sweep):  # a job process outlives its killed parent
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    log = (sweep / "0" / "train.log").read_text()
    assert "stopped by SIGUSR2" in log and "resumed from" in log  # saved, requeued, resumed
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2000


def test_phase_2_jobs_take_the_chosen_rate_into_phase_1_folder_names(tmp_path: Path) -> None:
    """sweep=leaderboard_seeds: the rate comes from the chosen-rates block, not from an override, and
    the folders are named as sweep=leaderboard names them, so both phases share one sweep folder."""
    from test_bad_inputs import invoke

    from moa_train.cli.main import train_main

    # the block as `leaderboard rates --write` writes it once a search has finished (the committed block
    # may still be empty): the override only fills it, the sweep reads the rate from it
    method, rate = "math_mola", 0.003
    block = [f"leaderboard_methods={method}", f"++leaderboard_rates.{method}={rate}"]
    sweep = tmp_path / "sweep"
    code, output = invoke(train_main, ["sweep=leaderboard_seeds", "model=tiny_random", "dry_run=true",
                                       *block, f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert code == 0, output[-3000:]
    assert sorted(p.name for p in _jobs(sweep)) == [
        f"experiment={method},optimizer.lr={rate},seed={s}" for s in (1, 2)
    ]


def test_a_fresh_clone_continues_a_committed_leaderboard_without_retraining(tmp_path: Path) -> None:
    """skip_recorded=<records>: a sweep job whose completed record is committed is not trained again
    (the sweep folder is gone, as on a fresh clone); the table says "recorded"; another budget trains."""
    from test_bad_inputs import invoke

    from moa_train.cli.main import train_main
    from moa_train.report import leaderboard as lb
    from moa_train.report.jobs import read_job

    sweep, records = tmp_path / "sweep", tmp_path / "records"
    args = ["-m", *ARGS, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    code, output = invoke(train_main, args, tmp_path)
    assert code == 0, output[-2000:]
    lb.collect(sweep, records)
    assert sorted(p.name for p in records.glob("*.json")) == ["0.json", "1.json"]
    shutil.rmtree(sweep)  # a fresh clone: the committed records, no run folders
    (records / "1.json").write_text((records / "1.json").read_text().replace('"completed"', '"failed"'))
    code, output = invoke(train_main, [*args, f"skip_recorded={records}"], tmp_path)
    assert code == 0, output[-2000:]
    job0, job1 = _jobs(sweep)
    assert not (job0 / "config.yaml").exists() and not (job0 / "final").exists()  # not trained
    assert (job1 / "final").is_dir()  # its record says failed: trained again
    rows = {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").read_text().splitlines())}
    assert rows["0"]["status"] == "recorded" and rows["1"]["status"] == "completed"
    assert read_job(job0, sweep).status == "recorded" and "not trained again" in read_job(job0, sweep).reason
    before = (records / "0.json").read_text()
    lb.collect(sweep, records)
    assert (records / "0.json").read_text() == before  # the record of a skipped job stays as it was


@pytest.mark.slow  # three more tiny sweeps
def test_a_record_of_another_budget_or_a_missing_records_folder_trains_the_job(tmp_path: Path) -> None:
    from test_bad_inputs import invoke

    from moa_train.cli.main import train_main
    from moa_train.report import leaderboard as lb

    sweep, records = tmp_path / "sweep", tmp_path / "records"
    code, output = invoke(train_main, ["-m", *ARGS, "seed=0", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert code == 0, output[-2000:]
    lb.collect(sweep, records)
    # another budget: the record does not stand for this job, which trains
    shutil.rmtree(sweep)
    longer = [
        "-m",
        *[a.replace("max_steps=2", "max_steps=3") for a in ARGS],
        "seed=0",
        f"hydra.sweep.dir={sweep}",
    ]
    code, output = invoke(train_main, [*longer, f"skip_recorded={records}"], tmp_path)
    assert code == 0, output[-2000:]
    assert (_jobs(sweep)[0] / "final").is_dir()
    # a folder that does not exist (a misspelling, or a board's first run): said, and every job trains
    shutil.rmtree(sweep)
    code, output = invoke(train_main, [*longer, f"skip_recorded={tmp_path / 'recrods'}"], tmp_path)
    assert code == 0 and "recrods is not a folder: this job is trained" in output, output[-2000:]


def test_the_chosen_rates_block_and_skip_recorded_do_not_make_a_job_folder_foreign() -> None:
    from moa_train.cli.sweep_jobs import _changed_keys

    saved = "optimizer: {lr: 0.003}\nleaderboard_methods: math_lora\nleaderboard_rates: {math_lora: 0.003}\n"
    grown = (
        "optimizer: {lr: 0.003}\nleaderboard_methods: math_lora,math_soft\n"
        "leaderboard_rates: {math_lora: 0.003, math_soft: 0.001}\nskip_recorded: docs/leaderboard/results\n"
    )
    assert _changed_keys(saved, grown) == []
    assert _changed_keys(saved, grown.replace("lr: 0.003}", "lr: 0.01}", 1)) == [
        ("optimizer.lr", 0.003, 0.01)
    ]


def test_jobs_of_a_sweep_stopped_by_a_signal_do_not_start_in_the_same_process(tmp_path: Path) -> None:
    """The basic launcher (and joblib with n_jobs=1) runs every job in the sweep's process: once a signal
    stopped one job, the launcher would start the next, with no signal pending. They must not start."""
    from test_bad_inputs import invoke

    from moa_train.cli import sweep_jobs
    from moa_train.cli.main import train_main
    from moa_train.errors import Preempted

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *TINY,
        "final_eval.enabled=false",
        "trainer.max_steps=2",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    sweep_jobs.note_stopped(Preempted("stopped by SIGTERM after step 1; checkpoint c", "r"))  # as job 0 would
    code, output = invoke(train_main, args, tmp_path)
    sweep_jobs._STOPPED.clear()  # a new sweep command is a new process
    assert code != 0 and "not started: this sweep was stopped (stopped by SIGTERM after step 1" in output
    assert "resume with" not in output  # nothing ran: the sweep command continues it
    assert not list(sweep.glob("*/summary.json")) and not list(sweep.glob("*/checkpoints"))
    code, output = invoke(train_main, args, tmp_path)  # run again: both jobs train
    assert code == 0, output[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["0", "1"]
