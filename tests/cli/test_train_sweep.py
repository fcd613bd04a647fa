"""`moa-train -m`: one folder per job and a summary table of every job when the sweep ends."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import TINY, run_cli

ARGS = TINY + ["final_eval.enabled=false", "trainer.max_steps=2", "trainer.save_every_steps=null"]


def test_multirun_writes_a_summary_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*ARGS, "seed=0,1", "trainer.progress_bar=true", f"hydra.sweep.dir={sweep}"]
    result = run_cli("moa-train", "-m", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2 [" in result.stderr and "tok_s=" in result.stderr  # rank 0's progress bar: steps, ETA, loss
    for job in ("0", "1"):
        assert (sweep / job / "final" / "adapter_model.safetensors").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert "seed=0" in rows[0]["overrides"] and "seed=1" in rows[1]["overrides"]
    assert all(float(r["train/loss"]) > 0 and int(r["step"]) == 2 for r in rows)
    markdown = (sweep / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | overrides | status |") and len(markdown) == 4
    (method,) = csv.DictReader((sweep / "summary_by_method.csv").open())  # seeds 0 and 1: one method
    assert (method["seeds"], method["completed"]) == ("0,1", "2/2")
    losses = [float(r["train/loss"]) for r in rows]
    assert float(method["train/loss_mean"]) == pytest.approx(sum(losses) / 2)
    assert float(method["train/loss_std"]) == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    assert " ± " in (sweep / "summary_by_method.md").read_text()


def test_default_multirun_folder_layout(tmp_path: Path) -> None:
    result = run_cli("moa-train", "-m", *ARGS, "seed=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (day,) = (tmp_path / "multirun").iterdir()
    (time_dir,) = day.iterdir()
    assert (time_dir / "0" / "summary.json").is_file() and (time_dir / "summary.csv").is_file()


def test_summary_table_tells_failed_jobs_from_unfinished_ones(tmp_path: Path) -> None:
    """A job without a summary is failed only when it left its reason; else it is still running (a
    parallel launcher refreshes the table after each job) or was stopped: incomplete, not failed."""
    from moa_train.cli.sweep import write_summary

    for job, files in {"0": {"summary.json": '{"status": "completed", "step": 2}'},
                       "1": {"error.txt": "error: trainer.max_steps=-3 is invalid\n"}, "2": {}}.items():  # fmt: skip
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        for name, text in files.items():
            (tmp_path / job / name).write_text(text)
    write_summary(tmp_path)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["status"], r["error"]) for r in rows] == [
        ("completed", ""),
        ("failed", "error: trainer.max_steps=-3 is invalid"),
        ("incomplete", ""),
    ]
