"""Per-method statistics of the leaderboard: the learning rate each method's search chose on the
validation loss, and the mean, 95% interval and Welch's test of its held-out accuracy over the seeds.
The rules are in the docstring of ``moa_train.report.leaderboard``."""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa_train.report.jobs import ReportError

NAMES = {  # experiment preset suffix -> method name
    "soft": "Soft MoA", "sparse": "Sparse MoA", "lora": "LoRA (r16)", "molora": "MoLoRA",
    "hydralora": "HydraLoRA", "topk": "Top-K MoE-LoRA", "adamole": "AdaMoLE", "mixlora": "MixLoRA",
    "mola": "MoLA", "dynmole": "DynMoLE", "loramoe": "LoRAMoE", "moslora": "MoSLoRA", "naive": "naive composition",
}  # fmt: skip


def number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


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


def method_name(experiment: str) -> str:
    """The method an experiment preset runs (``math_mola`` -> MoLA); the preset itself if unknown."""
    return NAMES.get(experiment.split("_", 1)[-1], experiment)


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
        return method_name(self.experiment)

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


def read_methods(config: Path) -> list[str]:
    """The method presets a leaderboard sweep config runs (``hydra.sweeper.params`` ``experiment``), in
    its order; a config that inherits them (``defaults: [leaderboard]``) is read through its defaults in
    the same folder. Empty when no config in that chain names them."""
    seen: set[Path] = set()
    todo = [config]
    while todo:
        path = todo.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            loaded = OmegaConf.load(path)
        except Exception:  # noqa: BLE001 - an unreadable config names no methods; read_grid reports it
            return []
        raw = OmegaConf.select(loaded, "hydra.sweeper.params.experiment", default=None)
        if raw is not None:
            return [m.strip() for m in str(raw).split(",") if m.strip()]
        for entry in OmegaConf.select(loaded, "defaults", default=None) or []:
            if isinstance(entry, str) and entry != "_self_":
                todo.append(path.with_name(f"{entry}.yaml"))
    return []


ONLY_RATE = "the grid's only rate"


def in_grid(lr: str, grid: set[float]) -> bool:
    """Whether the record rate ``lr`` (a string) is one of the rates of ``grid``."""
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
    one_rate_grid = grid is not None and len(grid) == 1  # a given grid of one rate: nothing to choose
    if grid is None:
        grid = sorted({float(lr) for by_lr in by_method.values() for lr in by_lr})
    grid_set = set(grid)
    entries = []
    for experiment, all_by_lr in by_method.items():
        by_lr = {lr: runs for lr, runs in all_by_lr.items() if in_grid(lr, grid_set)}
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
            seeds = ", ".join(sorted(search, key=seed_order))
            note = f"lowest validation loss, seed{'s' if len(search) > 1 else ''} {seeds}"
            if len(by_lr) < len(grid):
                note += f"; {len(by_lr)} of {len(grid)} rates run"
            if len(scored) < len(by_lr):
                note += f"; {len(by_lr) - len(scored)} rate(s) without a validation loss"
            if float(lr) in (grid[0], grid[-1]):  # the best may lie beyond the grid
                note += "; at the edge of the grid"
        elif one_rate_grid and by_lr:
            lr, note = next(iter(by_lr)), ONLY_RATE
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
        val = {float(lr): v for lr, (v, _) in e.val_by_lr.items() if in_grid(lr, set(grid))}
        searched = e.lr_note.startswith("lowest validation loss") and None not in val.values()
        if set(val) == set(grid) and (searched or e.lr_note == ONLY_RATE):
            rates[e.experiment] = float(e.lr)
    return rates


def seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.lstrip("-").isdigit() else (0, seed)
