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
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa_train.files import write_atomic
from moa_train.report.jobs import ReportError, find_jobs, read_base, read_job, task_map_for
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
NAMES = {  # experiment preset suffix -> method name
    "soft": "Soft MoA", "sparse": "Sparse MoA", "lora": "LoRA (r16)", "molora": "MoLoRA",
    "hydralora": "HydraLoRA", "topk": "Top-K MoE-LoRA", "adamole": "AdaMoLE", "mixlora": "MixLoRA",
    "mola": "MoLA", "dynmole": "DynMoLE", "loramoe": "LoRAMoE", "moslora": "MoSLoRA", "naive": "naive composition",
}  # fmt: skip


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
            "val_loss": _number(job.summary.get(objective)) or _last_logged(job_dir, objective),
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
        values = [_number(r.get(key)) for r in read_metrics(job_dir) if isinstance(r, dict)]
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


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def record_path(records: Path, job_name: str) -> Path:
    """Where ``collect`` writes the record of the sweep job ``job_name`` (its folder under the sweep)."""
    return records / (_safe(job_name) + ".json")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in name)


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------


def interval95(values: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean (Student t with n-1 degrees of freedom); None below 2 values."""
    if len(values) < 2:
        return None
    # deferred: scipy.stats is slow to import; keeps moa-report fast until a statistic is needed
    from scipy import stats

    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (None when either side has fewer than 2 values)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0

    # deferred: scipy.stats is slow to import (see interval95)
    from scipy import stats

    with warnings.catch_warnings():  # near-identical seeds: scipy warns about precision, the p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


@dataclass
class Entry:
    """One method at its chosen learning rate."""

    experiment: str
    lr: str | None
    lr_note: str
    val_by_lr: dict[str, tuple[float | None, int]]  # lr -> (mean validation loss, seeds)
    runs: list[dict[str, Any]]  # completed records at the chosen lr

    @property
    def name(self) -> str:
        return NAMES.get(self.experiment.split("_", 1)[-1], self.experiment)

    @property
    def scores(self) -> list[float]:
        return [statistics.fmean(r["accuracy"].values()) for r in self.runs if r["accuracy"]]

    def task(self, task: str) -> list[float]:
        return [r["accuracy"][task] for r in self.runs if task in r["accuracy"]]


def read_grid(config: Path) -> list[float]:
    """The learning rates of a leaderboard sweep config (``hydra.sweeper.params`` ``optimizer.lr``)."""
    if not config.is_file():
        raise ReportError(
            f"{config} not found: run from the repository root or pass --grid-config <the leaderboard sweep config>"
        )
    try:
        raw = OmegaConf.load(config).hydra.sweeper.params["optimizer.lr"]
        return sorted({float(v) for v in str(raw).split(",")})
    except Exception:  # noqa: BLE001  (any shape other than "a,b,c" is the same user error)
        raise ReportError(
            f"{config} has no learning-rate grid (hydra.sweeper.params optimizer.lr: a,b,c); pass the config whose "
            "hydra.sweeper.params sets optimizer.lr, e.g. configs/sweep/leaderboard.yaml"
        ) from None


def _in(lr: str, grid: set[float]) -> bool:
    try:
        return float(lr) in grid
    except ValueError:
        return False


def choose(records: list[dict[str, Any]], grid: list[float] | None = None) -> list[Entry]:
    """Per method: the rate of ``grid`` (default: every rate any method ran) with the lowest mean
    validation loss over its search seeds (those that ran every grid rate the method ran), and the
    completed runs at that rate over all seeds. Rates outside the grid are reported, never chosen."""
    by_method: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        if r.get("job") == "base_model" or r.get("status") != "completed":
            continue
        by_method.setdefault(str(r["experiment"]), {}).setdefault(str(r["lr"]), []).append(r)
    if grid is None:
        grid = sorted({float(lr) for by_lr in by_method.values() for lr in by_lr})
    in_grid = set(grid)
    entries = []
    for experiment, all_by_lr in by_method.items():
        by_lr = {lr: runs for lr, runs in all_by_lr.items() if _in(lr, in_grid)}
        # per rate, the seeds with a validation loss; a rate without any cannot compete
        seeds_by_lr = {
            lr: {str(r["seed"]) for r in runs if r.get("val_loss") is not None} for lr, runs in by_lr.items()
        }
        scored = {lr: seeds for lr, seeds in seeds_by_lr.items() if seeds}
        search = set.intersection(*scored.values()) if scored else set()  # the search seeds
        val = {}
        for lr, runs in all_by_lr.items():  # outside the grid too (every seed there): shown, never chosen
            losses = [
                r["val_loss"]
                for r in runs
                if (str(r["seed"]) in search or lr not in by_lr) and r.get("val_loss") is not None
            ]
            val[lr] = (statistics.fmean(losses) if losses else None, len(losses))
        chosen = {lr: v for lr, (v, _) in val.items() if v is not None and lr in by_lr}
        if chosen and len(by_lr) > 1:
            lr = min(chosen, key=lambda k: chosen[k])
            seeds = ", ".join(sorted(search, key=_seed_order))
            note = f"lowest validation loss, seed{'s' if len(search) > 1 else ''} {seeds}"
            if len(by_lr) < len(grid):
                note += f"; {len(by_lr)} of {len(grid)} rates run"
            if len(scored) < len(by_lr):
                note += f"; {len(by_lr) - len(scored)} rate(s) without a validation loss"
            if float(lr) in (grid[0], grid[-1]):  # the best may lie beyond the grid
                note += "; at the edge of the grid"
        elif chosen:
            lr, note = next(iter(chosen)), "only rate run (no search)"
        elif by_lr:
            lr = max(by_lr, key=lambda k: len(by_lr[k]))
            note = "no validation loss recorded: rate not chosen on validation"
        else:  # only rates the grid no longer holds: shown in the rate table, nothing to rank yet
            entries.append(Entry(experiment, None, "no job at a grid rate yet", val, []))
            continue
        entries.append(Entry(experiment, lr, note, val, by_lr[lr]))
    entries.sort(key=lambda e: -(statistics.fmean(e.scores) if e.scores else -1.0))
    return entries


def chosen_rates(records: list[dict[str, Any]], grid: list[float] | None = None) -> dict[str, float]:
    """method -> its chosen rate, for the methods whose search ran every rate of the grid."""
    if grid is None:
        grid = sorted(
            {
                float(r["lr"])
                for r in records
                if r.get("job") != "base_model" and r.get("status") == "completed"
            }
        )
    rates = {}
    for e in choose(records, grid):
        val = {float(lr): v for lr, (v, _) in e.val_by_lr.items() if _in(lr, set(grid))}
        if (
            e.lr_note.startswith("lowest validation loss")
            and set(val) == set(grid)
            and None not in val.values()
        ):
            rates[e.experiment] = float(e.lr)
    return rates


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


def _seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.lstrip("-").isdigit() else (0, seed)


# ---------------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------------


def load_records(results: Path) -> list[dict[str, Any]]:
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


def _pct(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def build_page(records: list[dict[str, Any]], intro: str = "", grid: list[float] | None = None) -> str:
    entries = choose(records, grid)
    base = next((r for r in records if r.get("job") == "base_model"), None)
    tasks = sorted({t for r in records for t in (r.get("accuracy") or {})})
    runs = [r for r in records if r.get("job") != "base_model"]
    done = [r for r in runs if r.get("status") == "completed"]
    budgets = sorted({json.dumps(r.get("budget") or {}, sort_keys=True) for r in done})
    lines = [intro.rstrip(), ""] if intro else []
    lines += [f"## Results ({datetime.now(timezone.utc):%Y-%m-%d}, rebuilt from {len(runs)} job records)", ""]
    if not runs:
        return "\n".join([*lines, "No job of this leaderboard has finished yet.", ""])
    lines.append(f"**What ran:** {len(done)} completed jobs, {len(runs) - len(done)} failed; "
                 f"{len(entries)} methods; learning rates tried: "
                 f"{', '.join(sorted({str(r['lr']) for r in done}, key=float)) or 'none'}; seeds: "
                 f"{', '.join(sorted({str(r['seed']) for r in done})) or 'none'}"
                 + (f"; the grid rates are chosen from: {', '.join(f'{g:g}' for g in grid)}" if grid else "")
                 + ".")  # fmt: skip
    for b in budgets:
        lines.append(
            "**Budget:** "
            + ", ".join(f"{k} {v if v is not None else 'all'}" for k, v in json.loads(b).items())
            + "."
        )
    best = entries[0] if entries else None
    head = [
        "method",
        "lr (how chosen)",
        "seeds",
        "mean acc %",
        "95% interval",
        *tasks,
        "vs best (Welch p)",
        "s/step",
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    if base is not None:
        acc = list(base["accuracy"].values())
        cells = ["base model (no adapters)", "–", "–", f"{100 * statistics.fmean(acc):.1f}", "–"]
        cells += [_pct([base["accuracy"][t]]) if t in base["accuracy"] else "–" for t in tasks] + ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for e in entries:
        ci = interval95(e.scores)
        p = welch_p(e.scores, best.scores) if best is not None and e is not best else None
        noise = (
            "best"
            if e is best
            else ("n/a (< 2 seeds)" if p is None else f"{p:.2f}" + (" (within noise)" if p >= 0.05 else ""))
        )
        timed = [r.get("summary") or {} for r in e.runs]
        secs = [
            t["train_seconds"] / t["step"] for t in timed if t.get("step") and _number(t.get("train_seconds"))
        ]
        cells = [
            f"{e.name} (`{e.experiment}`)",
            f"{e.lr or '–'} ({e.lr_note})",
            str(len(e.scores)),
            f"**{_pct(e.scores)}**",
            f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "–",
            *[_pct(e.task(t)) for t in tasks],
            noise,
            f"{statistics.fmean(secs):.1f}" if secs else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        *_noise_summary(entries),
        "",
        "### Learning-rate choice (mean validation loss over the search seeds; bold: chosen)",
        "",
    ]
    lrs = sorted({lr for e in entries for lr in e.val_by_lr}, key=float)
    lines += ["| method | " + " | ".join(lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for e in entries:
        cells = []
        for lr in lrs:
            v, n = e.val_by_lr.get(lr, (None, 0))
            text = "–" if not n else (f"{v:.4f} ({n})" if v is not None else f"n/a ({n})")
            cells.append(f"**{text}**" if lr == e.lr else text)
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    if grid is not None and (outside := [lr for lr in lrs if not _in(lr, set(grid))]):
        lines += ["", f"Rates the grid no longer holds (shown, never chosen): {', '.join(outside)}."]
    failed = [r for r in runs if r.get("status") != "completed"]
    lines += ["", f"### Failed jobs ({len(failed)})", ""]
    lines += [
        f"- `{r['job']}`: {r.get('status')}: {r.get('reason') or 'no reason recorded'}" for r in failed
    ] or ["none"]
    return "\n".join(lines).rstrip() + "\n"


def _noise_summary(entries: list[Entry]) -> list[str]:
    if len(entries) < 2:
        return ["One method only: nothing to compare."]
    best = entries[0]
    tied = [e.name for e in entries[1:] if (p := welch_p(e.scores, best.scores)) is not None and p >= 0.05]
    apart = [e.name for e in entries[1:] if (p := welch_p(e.scores, best.scores)) is not None and p < 0.05]
    untested = [e.name for e in entries if len(e.scores) < 2]
    text = [f"Best mean accuracy: **{best.name}**."]
    text.append(
        f"Within noise of it (Welch's t-test over seeds, p ≥ 0.05): {', '.join(tied) or 'none'}; "
        f"separated from it (p < 0.05): {', '.join(apart) or 'none'}"
        + (f"; not testable yet (fewer than 2 seeds): {', '.join(untested)}" if untested else "")
        + ". With 3 seeds the test has little power: "
        '"within noise" means the seeds cannot tell the methods apart, not that they are equal.'
    )
    return [" ".join(text)]


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
        page = build_page(load_records(args.results), intro, read_grid(args.grid_config))
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
