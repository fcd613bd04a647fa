"""The leaderboard page: records from a sweep folder, the lr chosen on validation, mean ± std, 95% interval,
which differences are within noise; the documented sweep is a Hydra multirun config, not a shell loop."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import moa_train.cli.main  # noqa: F401  (registers the moa_fail resolver)
from moa_train.errors import one_line
from moa_train.report import leaderboard as lb
from moa_train.report import leaderboard_page as lb_page
from moa_train.report import leaderboard_stats as lb_stats

TASKS = ("2_digit_addition", "3_digit_addition")


def _record(experiment: str, lr: str, seed: int, acc: tuple[float, float], val: float | None) -> dict:
    return {
        "job": f"experiment={experiment},optimizer.lr={lr},seed={seed}", "experiment": experiment, "lr": lr,
        "seed": str(seed), "status": "completed", "reason": "", "objective": "val/loss", "val_loss": val,
        "accuracy": dict(zip(TASKS, acc)), "eval_records": 200,
        "summary": {"step": 64, "train_seconds": 128.0}, "budget": {"steps": 64, "batch": 16}, "overrides": [],
    }  # fmt: skip


def _grid(folder: Path, rates: str) -> Path:
    config = folder / "grid.yaml"
    config.write_text(f"hydra:\n  sweeper:\n    params:\n      optimizer.lr: {rates}\n")
    return config


def test_interval_and_welch_match_textbook_values() -> None:
    low, high = lb_stats.interval95([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: t(0.975, 2) = 4.303
    assert (high - low) / 2 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert lb_stats.interval95([0.5]) is None
    # Welch on (1,2,3) vs (4,5,6): t = -3 / sqrt(2/3), 4 degrees of freedom -> p = 0.0213
    assert lb_stats.welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.0213, abs=5e-4)
    assert lb_stats.welch_p([0.2, 0.2], [0.2, 0.2]) == 1.0 and lb_stats.welch_p([0.1], [0.2, 0.3]) is None


def test_the_learning_rate_is_chosen_on_validation_not_on_the_held_out_items() -> None:
    records = []
    for seed in (0, 1, 2):
        # lr 1e-3 scores higher on the held-out items, but 3e-4 has the lower validation loss
        records.append(_record("math_lora", "1e-3", seed, (0.9, 0.9), 1.5 + seed / 100))
        records.append(_record("math_lora", "3e-4", seed, (0.3 + seed / 100, 0.4), 1.2 + seed / 100))
    (entry,) = lb_stats.choose(records)
    assert (
        entry.lr == "3e-4"
        and entry.lr_note == "lowest validation loss, seeds 0, 1, 2; at the edge of the grid"
    )
    assert entry.scores == pytest.approx([statistics.fmean((0.3 + s / 100, 0.4)) for s in (0, 1, 2)])
    assert entry.val_by_lr["1e-3"] == (pytest.approx(1.51), 3)


def test_page_reports_mean_std_interval_and_noise() -> None:
    records = [
        _record("math_soft", "3e-4", s, (0.50 + d, 0.50 - d), 1.0) for s, d in enumerate((0.0, 0.01, 0.02))
    ]
    records += [
        _record("math_lora", "3e-4", s, (0.49 + d, 0.49), 1.0) for s, d in enumerate((0.0, 0.02, 0.01))
    ]
    records += [
        _record("math_naive", "3e-4", s, (0.10 + d, 0.10), 1.0) for s, d in enumerate((0.0, 0.01, 0.02))
    ]
    records.append({"job": "broken", "experiment": "math_mola", "lr": "3e-4", "seed": "0", "status": "failed",
                    "reason": "error: out of memory", "accuracy": {}, "summary": {}})  # fmt: skip
    records.append({"job": "base_model", "status": "completed", "accuracy": dict(zip(TASKS, (0.0, 0.1)))})
    page = lb_page.build_page(records, intro="# Method leaderboard\n")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| ")}
    soft = rows["Soft MoA (`math_soft`)"]
    assert "**50.0 ± 0.0**" in soft and "| best |" in soft  # task errors cancel in the mean: std 0
    lora = rows["LoRA (r16) (`math_lora`)"]
    scores = [statistics.fmean((0.49 + d, 0.49)) for d in (0.0, 0.02, 0.01)]
    assert f"**{100 * statistics.fmean(scores):.1f} ± {100 * statistics.stdev(scores):.1f}**" in lora
    low, high = lb_stats.interval95(scores)
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in lora
    assert "(within noise)" in lora and "(within noise)" not in rows["naive composition (`math_naive`)"]
    assert "Within noise of it" in page and "LoRA (r16)" in page.split("Within noise of it")[1].split(";")[0]
    assert rows["base model (no adapters)"].split(" | ")[3] == "5.0"
    assert "3 completed jobs" not in page and "9 completed jobs, 1 failed" in page
    assert "`broken`: failed: error: out of memory" in page


def test_collect_records_finished_and_failed_jobs_and_skips_running_ones(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    jobs = {
        "experiment=math_lora,optimizer.lr=0.0003,seed=0": {"status": "completed", "train/loss": 1.0,
                                                            "val/loss": 1.25, "step": 64, "train_seconds": 64.0},
        "experiment=math_lora,optimizer.lr=0.0003,seed=1": None,  # still running
        "experiment=math_lora,optimizer.lr=0.001,seed=1": {"status": "preempted", "step": 14},  # resumes later
        "experiment=math_soft,optimizer.lr=0.0003,seed=0": "failed",
    }  # fmt: skip
    for name, summary in jobs.items():
        job = sweep / name
        (job / ".hydra").mkdir(parents=True)
        overrides = ["model=smollm2_135m", *name.split(",")]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (job / ".hydra" / "config.yaml").write_text("objective: val/loss\ntrainer:\n  max_steps: 64\n")
        if isinstance(summary, dict):
            (job / "summary.json").write_text(json.dumps(summary))
            preds = [{"dataset": "arith", "correct": i < 3} for i in range(4)]
            (job / "final_eval_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        elif summary == "failed":
            (job / "error.txt").write_text("error: data.max_len=1 is too short\n")
    out = tmp_path / "records"
    written = lb.collect(sweep, out)
    assert len(written) == 2
    done = json.loads((out / "experiment=math_lora,optimizer.lr=0.0003,seed=0.json").read_text())
    assert (done["status"], done["val_loss"], done["accuracy"], done["lr"]) == (
        "completed",
        1.25,
        {"arith": 0.75},
        "0.0003",
    )
    assert done["budget"]["steps"] == 64
    # a summary without the validation loss (finished by a resume from its last checkpoint): the log has it
    job = sweep / "experiment=math_lora,optimizer.lr=0.0003,seed=0"
    (job / "summary.json").write_text(json.dumps({"status": "completed", "step": 64}))
    (job / "metrics.jsonl").write_text(
        '{"step": 32, "val/loss": 1.5}\n{"step": 64, "val/loss": 1.3}\n{"step": 64, "tr'
    )
    lb.collect(sweep, out)
    assert (
        json.loads((out / "experiment=math_lora,optimizer.lr=0.0003,seed=0.json").read_text())["val_loss"]
        == 1.3
    )
    failed = json.loads((out / "experiment=math_soft,optimizer.lr=0.0003,seed=0.json").read_text())
    assert failed["status"] != "completed" and "data.max_len=1" in failed["reason"]
    page = lb_page.build_page(lb.load_records(out))
    assert "lr not chosen" not in page and "only rate run (no search)" in page


def test_page_command_rebuilds_from_records_and_keeps_the_intro(tmp_path: Path, capsys) -> None:
    out = tmp_path / "records"
    out.mkdir()
    for s in (0, 1, 2):
        (out / f"r{s}.json").write_text(
            json.dumps(_record("math_soft", "3e-4", s, (0.5, 0.4 + s / 10), None))
        )
    page = tmp_path / "leaderboard.md"
    page.write_text("# Method leaderboard\n\nHand-written intro.\n\n## Results (old)\nstale\n")
    lb.main(
        ["page", "--results", str(out), "--out", str(page), "--grid-config", str(_grid(tmp_path, "3e-4"))]
    )
    text = page.read_text()
    assert text.startswith("# Method leaderboard\n\nHand-written intro.") and "stale" not in text
    assert "| 3e-4 (the grid's only rate) | 3 |" in text  # a one-rate grid: nothing to choose, still ranked
    with pytest.raises(SystemExit) as exc:
        lb.main(["page", "--results", str(tmp_path / "missing"), "--out", str(page)])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_the_leaderboard_is_a_multirun_config_not_a_shell_loop() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert not (repo / "scripts" / "leaderboard.sh").exists()
    config = (repo / "configs" / "sweep" / "leaderboard.yaml").read_text()
    assert "mode: MULTIRUN" in config and "seed: ${seed}" in config


def test_two_phases_choose_the_rate_on_the_search_seed_and_report_every_seed_at_it() -> None:
    """Phase 1 runs every rate at seed 0; phase 2 only the chosen rate at seeds 1 and 2."""
    records = [
        _record("math_soft", "0.0001", 0, (0.9, 0.9), 0.60),  # best on the held-out items: never chosen
        _record("math_soft", "0.0003", 0, (0.2, 0.3), 0.40),
        _record("math_soft", "0.001", 0, (0.4, 0.5), 0.37),
        *[_record("math_soft", "0.001", s, (0.4 + s / 100, 0.5), 0.30 + s) for s in (1, 2)],
        _record("math_lora", "0.0001", 0, (0.1, 0.1), 0.70),  # a search still running: 2 of 3 rates
        _record("math_lora", "0.0003", 0, (0.2, 0.2), 0.50),
    ]
    entries = {e.experiment: e for e in lb_stats.choose(records)}
    soft = entries["math_soft"]
    # seeds 1, 2 ran only at 1e-3 and their (worse) losses do not enter the choice
    assert soft.lr == "0.001" and soft.lr_note == "lowest validation loss, seed 0; at the edge of the grid"
    assert soft.val_by_lr["0.001"] == (pytest.approx(0.37), 1) and len(soft.scores) == 3
    assert entries["math_lora"].lr_note == "lowest validation loss, seed 0; 2 of 3 rates run"
    assert lb_stats.chosen_rates(records) == {
        "math_soft": 0.001
    }  # an unfinished search is not replicated yet
    # a rate whose job recorded no validation loss cannot be chosen, and the method waits for it
    records += [
        _record("math_mola", lr, 0, (0.2, 0.2), val)
        for lr, val in (("0.0001", 0.6), ("0.0003", 0.5), ("0.001", None))
    ]
    mola = next(e for e in lb_stats.choose(records) if e.experiment == "math_mola")
    assert (
        mola.lr == "0.0003"
        and mola.lr_note == "lowest validation loss, seed 0; 1 rate(s) without a validation loss"
    )
    assert "math_mola" not in lb_stats.chosen_rates(records)


def test_progress_names_finished_methods_and_what_each_other_method_waits_for() -> None:
    grid = [1e-4, 3e-4, 1e-3]
    records = [
        _record("math_soft", lr, 0, (0.4, 0.5), val)
        for lr, val in (("0.0001", 0.6), ("0.0003", 0.5), ("0.001", 0.4))
    ]
    records += [_record("math_soft", "0.001", s, (0.4, 0.5), 0.4) for s in (1, 2)]  # 3 seeds: finished
    records += [
        _record("math_lora", lr, 0, (0.4, 0.5), val)
        for lr, val in (("0.0001", 0.6), ("0.0003", 0.4), ("0.001", 0.5))
    ]
    records.append(_record("math_lora", "0.0003", 1, (0.4, 0.5), 0.5))  # searched, 2 of 3 seeds
    records.append(_record("math_mola", "0.0003", 0, (0.4, 0.5), 0.5))  # 1 of 3 rates
    records.append(_record("math_mola", "0.01", 0, (0.4, 0.5), 0.5))  # off the grid: does not count
    methods = ["math_soft", "math_lora", "math_mola", "math_naive"]
    assert lb_page.progress(records, grid, methods) == (
        "**Progress:** 1 of 4 methods finished (searched, 3 seeds at the chosen rate); "
        "searched, seeds still to run: LoRA (r16) (2 of 3 seeds); search still running: MoLA (1 of 3 rates); "
        "not run yet: naive composition."
    )  # fmt: skip
    assert "**Progress:** 1 of 4 methods finished" in lb_page.build_page(records, grid=grid, methods=methods)
    repo = Path(__file__).resolve().parents[2]
    methods = lb_stats.read_methods(repo / "configs" / "sweep" / "leaderboard.yaml")
    assert len(methods) == 13 and methods[:2] == ["math_soft", "math_sparse"]
    # the GPU board inherits them through its defaults
    assert lb_stats.read_methods(repo / "configs" / "sweep" / "leaderboard_gpu.yaml") == methods


def test_rates_write_replaces_only_the_chosen_rates_block(tmp_path: Path, capsys) -> None:
    out = tmp_path / "records"
    out.mkdir()
    for i, (lr, val) in enumerate((("0.0001", 0.5), ("0.0003", 0.4))):
        (out / f"r{i}.json").write_text(json.dumps(_record("math_lora", lr, 0, (0.2, 0.2), val)))
    config = tmp_path / "seeds.yaml"
    config.write_text("# head\nname: x\n# ---- chosen rates: old ----\nleaderboard_methods: math_soft\n")
    grid = ["--grid-config", str(_grid(tmp_path, "1.0e-4,3.0e-4"))]
    lb.main(["rates", "--results", str(out), "--write", str(config), *grid])
    assert config.read_text().startswith("# head\nname: x\n# ---- chosen rates: written by")
    assert config.read_text().endswith(
        "leaderboard_methods: math_lora\nleaderboard_rates:\n  math_lora: 0.0003\n"
    )
    (tmp_path / "plain.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as exc:
        lb.main(["rates", "--results", str(out), "--write", str(tmp_path / "plain.yaml"), *grid])
    assert exc.value.code == 2 and "has no '# ---- chosen rates:' block" in capsys.readouterr().err
    assert (tmp_path / "plain.yaml").read_text() == "name: x\n"


def test_the_committed_phase_2_rates_are_the_ones_the_committed_records_choose() -> None:
    repo = Path(__file__).resolve().parents[2]
    config = (repo / "configs" / "sweep" / "leaderboard_seeds.yaml").read_text()
    grid = lb_stats.read_grid(repo / "configs" / "sweep" / "leaderboard.yaml")
    rates = lb_stats.chosen_rates(lb.load_records(repo / "docs" / "leaderboard" / "results"), grid)
    assert config.endswith(lb.rates_block(rates)), (
        "run: python -m moa_train.report.leaderboard rates --write configs/sweep/leaderboard_seeds.yaml"
    )


def test_the_committed_page_and_readme_are_the_ones_the_committed_records_build() -> None:
    """docs/leaderboard.md is rebuilt from the committed records (only its date may differ), and every
    accuracy the README's leaderboard paragraph quotes is a method's mean ± std on that page."""
    repo = Path(__file__).resolve().parents[2]
    committed = (repo / "docs" / "leaderboard.md").read_text(encoding="utf-8")
    config = repo / "configs" / "sweep" / "leaderboard.yaml"
    rebuilt = lb_page.build_page(
        lb.load_records(repo / "docs" / "leaderboard" / "results"),
        committed.split("\n## Results (")[0],
        lb_stats.read_grid(config),
        lb_stats.read_methods(config),
    )

    def undated(text: str) -> str:
        return re.sub(r"^## Results \(\d{4}-\d{2}-\d{2}, ", "## Results (", text, flags=re.M)

    assert undated(committed) == undated(rebuilt), "run: python -m moa_train.report.leaderboard page"
    readme = (
        (repo / "README.md").read_text(encoding="utf-8").split("### Method leaderboard")[1].split("\n## ")[0]
    )
    quoted = re.findall(r"\d+\.\d ± \d+\.\d", readme)
    table = re.findall(r"\*\*(\d+\.\d ± \d+\.\d)\*\*", rebuilt)
    assert quoted and set(quoted) <= set(table), "README quotes accuracies the leaderboard page does not have"
    finished = re.search(r"(\d+) of (\d+) methods finished", rebuilt)
    assert finished and f"{finished[1]} of the {finished[2]} methods are finished" in readme


def test_phase_2_before_any_search_stops_with_one_line_naming_the_fix() -> None:
    block = OmegaConf.create(lb.rates_block({}))
    with pytest.raises(Exception) as exc:
        _ = block.leaderboard_methods
    assert one_line(exc.value) == (
        "sweep=leaderboard_seeds has no chosen rates yet; run sweep=leaderboard first, collect its jobs, "
        "then python -m moa_train.report.leaderboard rates --write configs/sweep/leaderboard_seeds.yaml"
    )


def test_rates_the_grid_no_longer_holds_are_shown_but_never_chosen(tmp_path: Path) -> None:
    grid = lb_stats.read_grid(_grid(tmp_path, "3.0e-4,1.0e-3,3.0e-3"))
    assert grid == [3e-4, 1e-3, 3e-3]
    records = [
        _record("math_soft", "0.0001", 0, (0.1, 0.1), 0.10),  # lowest loss, but the grid dropped 1e-4
        _record("math_soft", "0.0003", 0, (0.2, 0.2), 0.50),
        _record("math_soft", "0.001", 0, (0.3, 0.3), 0.40),
        _record("math_soft", "0.003", 0, (0.4, 0.4), 0.45),
        _record("math_molora", "0.0001", 0, (0.1, 0.1), 0.60),  # no job at a grid rate yet
        _record("math_lora", "0.0001", 0, (0.1, 0.1), 0.30),
        _record("math_lora", "0.0003", 0, (0.1, 0.1), 0.35),  # 1 of 3 grid rates: not replicated yet
    ]
    entries = {e.experiment: e for e in lb_stats.choose(records, grid)}
    soft = entries["math_soft"]
    assert soft.lr == "0.001" and soft.lr_note == "lowest validation loss, seed 0"  # interior: no edge note
    assert soft.val_by_lr["0.0001"] == (pytest.approx(0.10), 1)  # still reported
    molora = entries["math_molora"]
    assert (molora.lr, molora.lr_note, molora.runs) == (None, "no job at a grid rate yet", [])
    assert entries["math_lora"].lr == "0.0003"
    assert entries["math_lora"].lr_note == "only rate run (no search)"
    assert lb_stats.chosen_rates(records, grid) == {"math_soft": 0.001}
    assert lb_stats.chosen_rates(records) == {
        "math_soft": 0.0001
    }  # without a grid, every rate any method ran counts
    page = lb_page.build_page(records, grid=grid)
    assert "Rates the grid no longer holds (shown, never chosen): 0.0001." in page
    # only a method whose search ran every grid rate is ranked; the others wait in the rate table
    assert (
        "(`math_molora`)" not in page and "(`math_lora`)" not in page and "| Soft MoA (`math_soft`) |" in page
    )
    assert "Not ranked until their search has run every grid rate: LoRA (r16), MoLoRA." in page
    assert "| MoLoRA | **0.6000 (1)** | – | – | – |" not in page and "| MoLoRA | 0.6000 (1) |" in page
    assert "the grid rates are chosen from: 0.0003, 0.001, 0.003" in page


def test_the_grid_comes_from_the_sweep_configs_and_a_wrong_one_stops_with_one_line(
    tmp_path: Path, capsys
) -> None:
    repo = Path(__file__).resolve().parents[2]
    assert lb_stats.read_grid(repo / "configs" / "sweep" / "leaderboard.yaml") == [3e-4, 1e-3, 3e-3, 1e-2]
    assert lb_stats.read_grid(repo / "configs" / "sweep" / "leaderboard_gpu.yaml") == [1e-4, 3e-4, 1e-3, 3e-3]
    (tmp_path / "records").mkdir()
    for config, message in (
        (tmp_path / "missing.yaml", "not found: run from the repository root or pass --grid-config"),
        (tmp_path / "grid.yaml", "has no learning-rate grid"),
    ):
        (tmp_path / "grid.yaml").write_text("name: x\n")
        with pytest.raises(SystemExit) as exc:
            lb.main(["rates", "--results", str(tmp_path / "records"), "--grid-config", str(config)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_fresh_clone_would_skip_every_committed_job() -> None:
    """skip_recorded matches a record to its job by the budget: every committed record's budget is the
    one its job composes to now (a changed budget in the sweep config makes the records stale)."""
    from conftest import compose_config

    repo = Path(__file__).resolve().parents[2]
    records = [
        r for r in lb.load_records(repo / "docs" / "leaderboard" / "results") if r.get("job") != "base_model"
    ]
    by_method = {str(r["experiment"]): r for r in records if r.get("status") == "completed"}
    assert by_method, "no committed record"
    for record in by_method.values():
        cfg = compose_config(
            ["sweep=leaderboard", "model=smollm2_135m", "data=arith_mix", "logger=none",
             f"experiment={record['experiment']}", f"optimizer.lr={record['lr']}", f"seed={record['seed']}"],
            hydra=True,
        )  # fmt: skip
        assert str(cfg.skip_recorded) == "docs/leaderboard/results"
        assert lb.recorded(repo / "docs" / "leaderboard" / "results", record["job"], cfg) == record, record[
            "job"
        ]
