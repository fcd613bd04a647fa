"""The method leaderboard page (docs/leaderboard.md) from the jobs of ``moa-train sweep=leaderboard``.

Two steps, so that a leaderboard can grow over several sessions:

``collect SWEEP_DIR [--base DIR]``
    one small JSON record per finished (or failed) job of the sweep folder into ``--into``
    (default ``docs/leaderboard/results``): method, learning rate, seed, the validation loss, the
    held-out accuracy per task, throughput, the budget. Jobs still running are left out. Records are
    meant to be committed; collecting again replaces a job's record.
``page``
    rebuilds ``--out`` (default ``docs/leaderboard.md``) from every record found, whatever finished.

``rates [--write CONFIG]``
    the rate each method's search chose, as the block that ends ``configs/sweep/leaderboard_seeds.yaml``
    (the second phase: more seeds at the chosen rates); ``--write`` replaces that block in CONFIG.

``page`` and ``rates`` choose among the learning rates of the sweep config's grid (``--grid-config``,
default ``configs/sweep/leaderboard.yaml``, its ``hydra.sweeper.params`` ``optimizer.lr``): records at
rates the grid no longer holds are shown on the page but never chosen.

Statistics (per method): the learning rate is the one with the lowest mean validation loss over the
seeds that ran every rate of the grid (the search seeds: seed 0 when the other seeds run only at the
chosen rate; the same grid for every method; the held-out items are never used to choose it); at that rate,
the held-out accuracy (unweighted mean over the tasks) is given as mean ± sample std over the seeds
and a 95% interval for the mean (Student t, n-1 degrees of freedom). A method is "within noise" of the
best one when Welch's t-test over the seeds does not separate them at the 5% level.
Only methods whose search ran every rate of the grid are ranked; the page's progress line says what
the others wait for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa_train.files import write_atomic
from moa_train.report.jobs import ReportError, find_jobs, read_base, read_job, task_map_for
from moa_train.report.leaderboard_page import build_page
from moa_train.report.leaderboard_stats import chosen_rates, number, read_grid, read_methods
from moa_train.train.loggers import read_metrics

RESULTS = Path("docs/leaderboard/results")
PAGE = Path("docs/leaderboard.md")
GRID_CONFIG = Path("configs/sweep/leaderboard.yaml")
SWEEP_KEYS = ("experiment", "optimizer.lr", "seed")
BUDGET_KEYS = {  # config path -> shown as
    "model.name": "model",
    "data.name": "data",
    "trainer.max_steps": "steps",
    "trainer.effective_batch_size": "batch",
    "trainer.precision": "precision",
    "final_eval.max_records": "eval records",
}
SUMMARY_KEYS = (
    "step",
    "train/loss",
    "train/tokens_per_s",
    "train_seconds",
    "trainable_params",
    "peak_memory_mb",
)


# ---------------------------------------------------------------------------------------------------
# collect
# ---------------------------------------------------------------------------------------------------


def collect(sweep_dir: Path, into: Path = RESULTS, base: Path | None = None) -> list[Path]:
    """Write one record per finished or failed job of ``sweep_dir`` (and the base model) into ``into``."""
    job_dirs = find_jobs(sweep_dir)
    task_map = task_map_for(job_dirs)
    into.mkdir(parents=True, exist_ok=True)
    written = []
    for job_dir in job_dirs:
        job = read_job(job_dir, sweep_dir, None, task_map)
        if job.status == RECORDED:
            continue  # skipped by the sweep because its record is here already: that record stays
        if job.status == "running" or (
            job.status in ("incomplete", "preempted") and not (job_dir / "error.txt").is_file()
        ):
            stale = record_path(into, job.name)
            stale.unlink(missing_ok=True)  # a record from before a rerun is not this job's result
            continue  # still running, stopped to resume later, or killed without a word: no result yet
        values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in job.overrides if "=" in o}
        config = _config(job_dir)
        objective = str(_select(config, "objective") or "val/loss")
        record = {
            "job": job.name,
            "experiment": values.get("experiment") or _select(config, "name"),
            "lr": values.get("optimizer.lr") or _select(config, "optimizer.lr"),
            "seed": job.seed,
            "status": "completed" if job.ok else job.status,
            "reason": job.reason,
            "objective": objective,
            "val_loss": number(job.summary.get(objective)) or _last_logged(job_dir, objective),
            "accuracy": job.datasets,
            "eval_records": job.n_eval,
            "summary": {k: job.summary[k] for k in SUMMARY_KEYS if k in job.summary},
            "budget": budget_of(config),
            "overrides": job.overrides,
        }
        path = record_path(into, job.name)
        write_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        written.append(path)
    base = base if base is not None else sweep_dir / "base_model"
    base_job = read_base(base, task_map)
    if base_job is not None:
        record = {
            "job": "base_model",
            "status": "completed",
            "accuracy": base_job.datasets,
            "eval_records": base_job.n_eval,
        }
        path = into / "base_model.json"
        write_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written


def budget_of(config: Any) -> dict[str, Any]:
    """The budget a record keeps (model, data, steps, batch, precision, eval records) of a job's config."""
    return {name: _select(config, key) for key, name in BUDGET_KEYS.items()}


RECORDED = "recorded"  # the summary status of a sweep job skipped because its record exists


def recorded(records: Path, job_name: str, config: Any) -> dict[str, Any] | None:
    """The completed record of the sweep job ``job_name`` in ``records`` when it was trained on the
    budget of ``config`` (the job's config now); None otherwise (no record, a failed one, another budget)."""
    try:
        record = json.loads(record_path(records, job_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "completed":
        return None
    return record if record.get("budget") == budget_of(config) else None


def _last_logged(job_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in the job's metrics.jsonl: the validation loss of a job whose summary
    lacks it (a job finished by a resume from its last checkpoint, before the summary kept that pass)."""
    try:
        values = [number(r.get(key)) for r in read_metrics(job_dir) if isinstance(r, dict)]
    except (OSError, ValueError):  # unreadable or damaged: the record has no validation loss
        return None
    return next((v for v in reversed(values) if v is not None), None)


def _config(job_dir: Path) -> Any:
    # the run's resolved config first: Hydra's copy keeps interpolations that resolve only inside the job
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                return OmegaConf.load(path)
            except Exception:  # noqa: BLE001 - damaged: the record lacks the budget
                return None
    return None


def _select(config: Any, key: str) -> Any:
    if config is None:
        return None
    try:
        value = OmegaConf.select(config, key, default=None)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve outside the job
        value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def record_path(records: Path, job_name: str) -> Path:
    """Where ``collect`` writes the record of the sweep job ``job_name`` (its folder under the sweep)."""
    return records / (_safe(job_name) + ".json")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in name)


RATES_MARKER = "# ---- chosen rates:"
NO_RATES = (  # what sweep=leaderboard_seeds says when run before any method's search has finished
    "${moa_fail:'sweep=leaderboard_seeds has no chosen rates yet; run sweep=leaderboard first, collect its "
    "jobs, then python -m moa_train.report.leaderboard rates --write configs/sweep/leaderboard_seeds.yaml'}"
)


def rates_block(rates: dict[str, float]) -> str:
    """The end of ``configs/sweep/leaderboard_seeds.yaml``: the methods to replicate and their rates."""
    lines = [
        f"{RATES_MARKER} written by `python -m moa_train.report.leaderboard rates --write` (do not edit) ----",
        f"leaderboard_methods: {','.join(sorted(rates)) or NO_RATES}",
        "leaderboard_rates:" + ("" if rates else " {}"),
        *[f"  {name}: {rate!r}" for name, rate in sorted(rates.items())],
    ]
    return "\n".join(lines) + "\n"


def write_rates(config: Path, rates: dict[str, float]) -> None:
    """Replace the chosen-rates block at the end of ``config`` (everything from its marker line on)."""
    text = config.read_text(encoding="utf-8") if config.is_file() else ""
    if RATES_MARKER not in text:
        raise ReportError(
            f"{config} has no '{RATES_MARKER}' block; pass configs/sweep/leaderboard_seeds.yaml"
        )
    write_atomic(config, text.split(RATES_MARKER)[0] + rates_block(rates))


def load_records(results: Path) -> list[dict[str, Any]]:
    """Every record of the folder ``results`` (``collect`` writes them)."""
    if not results.is_dir():
        raise ReportError(f"{results} is not a folder; run `collect <sweep dir>` first")
    records = []
    for path in sorted(results.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ReportError(
                f"{path} is not a readable record ({exc}); delete it and collect again"
            ) from None
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moa_train.report.leaderboard", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="record the finished jobs of a sweep folder")
    c.add_argument("sweep_dir", type=Path)
    c.add_argument("--into", type=Path, default=RESULTS, help=f"records folder (default {RESULTS})")
    base_help = "moa-eval folder of the base model (default <sweep>/base_model)"
    c.add_argument("--base", type=Path, default=None, help=base_help)
    p = sub.add_parser("page", help="rebuild the leaderboard page from the records")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"records folder (default {RESULTS})")
    p.add_argument("--out", type=Path, default=PAGE, help=f"the page (default {PAGE})")
    intro_help = "markdown put above the results (default: the page's own text above '## Results')"
    p.add_argument("--intro", type=Path, default=None, help=intro_help)
    r = sub.add_parser("rates", help="the rate each method's search chose (for sweep=leaderboard_seeds)")
    r.add_argument("--results", type=Path, default=RESULTS, help=f"records folder (default {RESULTS})")
    for command in (p, r):
        grid_help = (
            f"the sweep config whose optimizer.lr grid the rates are chosen from (default {GRID_CONFIG})"
        )
        command.add_argument("--grid-config", type=Path, default=GRID_CONFIG, help=grid_help)
    r.add_argument("--write", type=Path, default=None, help="replace the chosen-rates block of this config")
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            written = collect(args.sweep_dir, args.into, args.base)
            print(f"{len(written)} records written to {args.into}")
            return
        if args.command == "rates":
            rates = chosen_rates(load_records(args.results), read_grid(args.grid_config))
            if args.write is None:
                print(rates_block(rates), end="")
            else:
                write_rates(args.write, rates)
                print(f"written: {args.write} ({len(rates)} methods)")
            return
        intro = args.intro.read_text(encoding="utf-8") if args.intro else _own_intro(args.out)
        page = build_page(
            load_records(args.results), intro, read_grid(args.grid_config), read_methods(args.grid_config)
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, page)
        print(f"written: {args.out}")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _own_intro(page: Path) -> str:
    """The hand-written part of an existing page: everything above its generated results."""
    if not page.is_file():
        return ""
    return page.read_text(encoding="utf-8").split("\n## Results (")[0]


if __name__ == "__main__":
    main()
