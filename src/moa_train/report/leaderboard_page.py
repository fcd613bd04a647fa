"""The generated part of the leaderboard page: the results table, which methods are within noise of
the best, the learning-rate choice and the progress of the leaderboard, from the job records."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from typing import Any

from moa_train.report.leaderboard_stats import (
    Entry,
    choose,
    chosen_rates,
    in_grid,
    interval95,
    method_name,
    number,
    welch_p,
)
from moa_train.report.methods import mean_std

SEEDS = 3  # a method is finished with this many seeds at its chosen rate (the search seed + sweep=leaderboard_seeds)


def _pct(values: list[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * mean:.1f}"


def build_page(
    records: list[dict[str, Any]],
    intro: str = "",
    grid: list[float] | None = None,
    methods: list[str] | None = None,
) -> str:
    """The page: ``intro``, then the results of ``records`` (the rates chosen from ``grid``), and how far
    each of ``methods`` (the presets the sweep runs; default: those with a record) has got."""
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
    lines.append(progress(records, grid, methods))
    for b in budgets:
        lines.append(
            "**Budget:** "
            + ", ".join(f"{k} {v if v is not None else 'all'}" for k, v in json.loads(b).items())
            + "."
        )
    # with a grid, only methods whose search ran every grid rate are ranked: a rate picked from part of
    # the grid, or one never compared on validation, is not the protocol's choice
    searched = chosen_rates(records, grid) if grid is not None else None
    ranked = [e for e in entries if searched is None or e.experiment in searched]
    best = ranked[0] if ranked else None
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
    for e in ranked:
        ci = interval95(e.scores)
        p = welch_p(e.scores, best.scores) if best is not None and e is not best else None
        noise = (
            "best"
            if e is best
            else ("n/a (< 2 seeds)" if p is None else f"{p:.2f}" + (" (within noise)" if p >= 0.05 else ""))
        )
        timed = [r.get("summary") or {} for r in e.runs]
        secs = [
            t["train_seconds"] / t["step"] for t in timed if t.get("step") and number(t.get("train_seconds"))
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
    unranked = [e.name for e in entries if e not in ranked]
    lines += [
        "",
        *_noise_summary(ranked),
        *(
            [f"Not ranked until their search has run every grid rate: {', '.join(unranked)}."]
            if unranked
            else []
        ),
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
            cells.append(f"**{text}**" if lr == e.lr and e in ranked else text)
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    if grid is not None and (outside := [lr for lr in lrs if not in_grid(lr, set(grid))]):
        lines += ["", f"Rates the grid no longer holds (shown, never chosen): {', '.join(outside)}."]
    failed = [r for r in runs if r.get("status") != "completed"]
    lines += ["", f"### Failed jobs ({len(failed)})", ""]
    lines += [
        f"- `{r['job']}`: {r.get('status')}: {r.get('reason') or 'no reason recorded'}" for r in failed
    ] or ["none"]
    return "\n".join(lines).rstrip() + "\n"


def _noise_summary(entries: list[Entry]) -> list[str]:
    if not entries:
        return ["No method has finished its search yet: nothing to rank."]
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


def progress(
    records: list[dict[str, Any]], grid: list[float] | None, methods: list[str] | None = None
) -> str:
    """One line: which methods are finished (every grid rate searched, SEEDS seeds at the chosen rate),
    which wait for seeds or for the rest of their search, and which have not run."""
    entries = {e.experiment: e for e in choose(records, grid)}
    methods = methods or sorted(entries)
    searched = chosen_rates(records, grid)
    grid_set = set(grid) if grid is not None else None
    finished, seeding, searching, not_run = [], [], [], []
    for m in methods:
        e, name = entries.get(m), method_name(m)
        if m in searched and e is not None:  # a searched method always has an entry
            if len(e.scores) >= SEEDS:
                finished.append(name)
            else:
                seeding.append(f"{name} ({len(e.scores)} of {SEEDS} seeds)")
        elif e is not None and (
            ran := [
                lr for lr, (_, n) in e.val_by_lr.items() if n and (grid_set is None or in_grid(lr, grid_set))
            ]
        ):
            searching.append(f"{name} ({len(ran)} of {len(grid) if grid else len(ran)} rates)")
        else:
            not_run.append(name)
    parts = [
        f"{len(finished)} of {len(methods)} methods finished (searched, {SEEDS} seeds at the chosen rate)"
    ]
    for label, names in (
        ("searched, seeds still to run", seeding),
        ("search still running", searching),
        ("not run yet", not_run),
    ):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "**Progress:** " + "; ".join(parts) + "."
