"""moa-report: per-method mean ± std over seeds, failed jobs listed, CSV + markdown + PNG, partial sweeps."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from moa_train.report import build_report, main, mean_std, write_report


def make_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    *,
    correct: dict[str, list[int]] | None = None,
    summary: dict | None = None,
    log: str | None = None,
) -> Path:
    """A job folder as Hydra's basic launcher + the trainer leave it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), "0")
    (job / ".hydra" / "config.yaml").write_text(f"name: x\nseed: {seed}\n")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if correct is not None:
        with open(job / "final_eval_predictions.jsonl", "w") as f:
            for dataset, hits in correct.items():
                for hit in hits:
                    f.write(json.dumps({"dataset": dataset, "correct": bool(hit)}) + "\n")
    if log is not None:
        (job / "train.log").write_text(log)
    return job


def ok_summary(params: int, tps: float, **extra) -> dict:
    return {
        "status": "completed",
        "trainable_params": params,
        "train/tokens_per_s": tps,
        "train_seconds": 10.0,
        "base_accuracy": 0.1,
        **extra,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    common = ["model=tiny_random", "trainer.max_steps=2"]
    # method a: 2 seeds, datasets add (2 items) and sub (2 items)
    make_job(root, 0, ["experiment=math_soft", "seed=0", *common],
             correct={"add": [1, 1], "sub": [0, 1]}, summary=ok_summary(100, 50.0, peak_memory_mb=300.0))  # fmt: skip
    make_job(root, 1, ["experiment=math_soft", "seed=1", *common],
             correct={"add": [1, 0], "sub": [0, 0]}, summary=ok_summary(100, 70.0, peak_memory_mb=320.0))  # fmt: skip
    # method b: one completed seed, one failed job (no summary, an error in its log)
    make_job(root, 2, ["experiment=math_lora", "seed=0", *common],
             correct={"add": [0, 0], "sub": [1, 1]}, summary=ok_summary(200, 90.0))  # fmt: skip
    make_job(root, 3, ["experiment=math_lora", "seed=1", *common],
             log="[x][moa_train.train.recipe][INFO] - training\nRuntimeError: CUDA out of memory\n")  # fmt: skip
    # method c: never finished anything
    make_job(root, 4, ["experiment=math_molora", "seed=0", *common])
    return root


def test_mean_std_is_sample_std() -> None:
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([]) == (None, None)


def test_report_groups_seeds_and_lists_failed_jobs(sweep: Path) -> None:
    report = build_report([sweep])
    assert report.common == ["model=tiny_random", "trainer.max_steps=2"]
    labels = [m.label for m in report.methods]
    assert labels == ["math_soft", "math_lora", "math_molora"]
    soft, lora, molora = report.methods
    assert [j.seed for j in soft.jobs] == ["0", "1"]
    # per-dataset accuracy of each seed, then mean ± sample std over seeds
    assert soft.accuracy("add") == pytest.approx((0.75, statistics.stdev([1.0, 0.5])))
    assert soft.accuracy("sub") == pytest.approx((0.25, statistics.stdev([0.5, 0.0])))
    # mean acc = unweighted mean over datasets per seed: seed0 0.75, seed1 0.25
    assert soft.accuracy(None) == pytest.approx((0.5, statistics.stdev([0.75, 0.25])))
    assert soft.params() == 100
    assert soft.summary_value("train/tokens_per_s")[0] == pytest.approx(60.0)
    assert soft.peak_memory_mb() == pytest.approx(320.0)
    assert len(lora.done) == 1 and len(lora.jobs) == 2
    assert lora.accuracy(None) == (0.5, None)
    assert molora.done == [] and molora.accuracy(None) == (None, None)

    md = report.markdown()
    assert "| math_soft | 2/2 | 100 | 75.0 ± 35.4 | 25.0 ± 35.4 | 50.0 ± 35.4 | 60 | 320 |" in md
    assert "| math_lora | 1/2 | 200 | 0.0 | 100.0 | 50.0 | 90 | n/a |" in md
    assert "| math_molora | 0/1 | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    failed = md.split("## Failed, running or incomplete jobs (2)")[1].split("## Jobs")[0]
    assert "| 3 |" in failed and "CUDA out of memory" in failed
    assert "| 4 |" in failed and "no summary.json" in failed
    assert "Base model (adapters off)" in md and "10.0 %" in md


def test_report_files(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(build_report([sweep]), tmp_path / "out")
    assert {p.name for p in paths.values()} == {"report.md", "report.csv", "report_jobs.csv", "report.png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["method"] for r in rows] == ["math_soft", "math_lora", "math_molora"]
    assert float(rows[0]["acc_add_mean"]) == pytest.approx(0.75)
    assert float(rows[0]["mean_acc_std"]) == pytest.approx(statistics.stdev([0.75, 0.25]))
    assert rows[1]["failed_jobs"] == "3"
    jobs = list(csv.DictReader(open(paths["jobs_csv"])))
    assert [r["status"] for r in jobs] == ["completed", "completed", "completed", "incomplete", "incomplete"]


def test_moa_eval_results_take_precedence(sweep: Path) -> None:
    results = sweep / "0" / "final" / "eval" / "math6" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(
        json.dumps({"n": 4, "datasets": {"gsm8k": {"accuracy": 0.5}, "SVAMP": {"accuracy": 1.0}}})
    )
    report = build_report([sweep], eval_name="math6")
    job0 = report.jobs[0]
    assert job0.datasets == {"gsm8k": 0.5, "SVAMP": 1.0}
    assert job0.eval_source == "final/eval/math6/results.json"
    assert job0.mean_accuracy == pytest.approx(0.75)
    assert report.jobs[1].eval_source == "final_eval_predictions.jsonl"  # falls back per job


def test_cli_writes_report_and_errors_cleanly(sweep: Path, tmp_path: Path, capsys) -> None:
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "| math_soft | 2/2 |" in out and (sweep / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "moa_train.report", str(empty)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: no job folders") and len(proc.stderr.strip().splitlines()) == 1
    )


def test_sweep_summary_gains_mean_std_over_seeds(sweep: Path) -> None:
    from moa_train.cli.sweep import write_summary

    for num, acc in ((0, 0.5), (1, 0.7)):  # what the trainer's final evaluation adds to summary.json
        path = sweep / str(num) / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tuned_accuracy": acc}))
    write_summary(sweep)
    rows = list(csv.DictReader(open(sweep / "summary_by_method.csv")))
    by = {r["method"]: r for r in rows}
    methods = [
        f"experiment={m} model=tiny_random trainer.max_steps=2"
        for m in ("math_soft", "math_lora", "math_molora")
    ]
    assert list(by) == methods
    soft, lora = by[methods[0]], by[methods[1]]
    assert soft["seeds"].replace(",", " ").split() == ["0", "1"] and soft["completed"] == "2/2"
    assert float(soft["tuned_accuracy_mean"]) == pytest.approx(0.6)
    assert float(soft["tuned_accuracy_std"]) == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert float(soft["train/tokens_per_s_mean"]) == pytest.approx(60.0)
    assert lora["completed"] == "1/2" and lora["train/tokens_per_s_std"] == ""
    md = (sweep / "summary_by_method.md").read_text()
    assert methods[0] in md and "0.6 ± 0.14" in md


def test_mixed_dataset_splits_into_tasks_and_base_model_row(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for num, seed in ((0, "0"), (1, "1")):
        job = make_job(root, num, ["experiment=math_soft", f"seed={seed}"], summary=ok_summary(100, 50.0))
        with open(job / "final_eval_predictions.jsonl", "w") as f:  # one mixed dataset, tasks known
            for task, hit in (("arithmetic/2_digit_addition", 1), ("arithmetic/2_digit_subtraction", num)):
                f.write(json.dumps({"dataset": "arith_mix", "task": task, "correct": bool(hit)}) + "\n")
    base = root / "base_model"  # what `moa-eval checkpoint=null ... output_dir=<sweep>/base_model` writes
    base.mkdir()
    (base / "results.json").write_text(json.dumps({"n": 2, "datasets": {"arith_mix": {"accuracy": 0.5}}}))
    (base / "predictions.jsonl").write_text(
        json.dumps({"dataset": "arith_mix", "task": "arithmetic/2_digit_addition", "correct": True})
        + "\n"
        + json.dumps({"dataset": "arith_mix", "task": "arithmetic/2_digit_subtraction", "correct": False})
        + "\n"
    )
    report = build_report([root])
    assert [m.label for m in report.methods] == ["base model (no adapters)", "math_soft"]
    assert report.datasets == ["2_digit_addition", "2_digit_subtraction"]
    assert len(report.jobs) == 2  # the base evaluation is not a job of the sweep
    md = report.markdown()
    assert "| base model (no adapters) | – | 0 | 100.0 | 0.0 | 50.0 |" in md
    assert "| math_soft | 2/2 | 100 | 100.0 ± 0.0 | 50.0 ± 70.7 | 75.0 ± 35.4 |" in md
    assert write_report(report, tmp_path / "out")["png"].is_file()


def test_a_preempted_job_names_its_checkpoint_and_how_to_resume(tmp_path: Path) -> None:
    from moa_train.report.jobs import read_job

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    message = f"stopped by SIGTERM after step 3; checkpoint {job}/checkpoints/step-3"
    (job / "summary.json").write_text(json.dumps({"status": "preempted", "step": 3, "stop_message": message}))
    found = read_job(job, tmp_path / "sweep")
    assert (found.status, found.reason) == ("preempted", f"{message}; run the same sweep again to resume it")


def test_jobs_with_the_same_overrides_but_another_setting_are_not_averaged(tmp_path: Path) -> None:
    """The leaderboard's phase 2 takes the rate from a preset block: same overrides, other rate."""
    root = tmp_path / "sweep"
    runs = [(1, 0.001, 0.2), (2, 0.001, 0.4), (1, 0.003, 0.6), (2, 0.003, 0.8)]
    for num, (seed, lr, acc) in enumerate(runs):
        job = make_job(root, num, ["experiment=math_lora", f"seed={seed}", "sweep=leaderboard_seeds"],
                       summary=ok_summary(10, 50.0, tuned_accuracy=acc))  # fmt: skip
        (job / "config.yaml").write_text(  # the run config: seeds and the chosen-rates block never split
            f"seed: {seed}\ndata:\n  seed: {seed}\noptimizer:\n  lr: {lr}\n"
            f"leaderboard_rates:\n  math_lora: {lr}\nresume: null\n"
        )
    report = build_report([root])
    by_label = {m.label: (len(m.done), m.summary_value("tuned_accuracy")[0]) for m in report.methods}
    assert by_label == {
        "math_lora optimizer.lr=0.001": (2, pytest.approx(0.3)),
        "math_lora optimizer.lr=0.003": (2, pytest.approx(0.7)),
    }
    from moa_train.cli.sweep import write_summary

    write_summary(root)  # the sweep's own summary_by_method table splits the same way
    rows = list(csv.DictReader((root / "summary_by_method.csv").open()))
    assert {(r["method"], r["completed"], round(float(r["tuned_accuracy_mean"]), 6)) for r in rows} == {
        ("experiment=math_lora sweep=leaderboard_seeds optimizer.lr=0.001", "2/2", 0.3),
        ("experiment=math_lora sweep=leaderboard_seeds optimizer.lr=0.003", "2/2", 0.7),
    }
