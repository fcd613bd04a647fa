"""Training tokens/s with the LM head on the target positions only (what training does) against the LM
head on every position (the baseline), measured in one process.

    .venv/bin/python scripts/loss_positions_gain.py [hydra overrides ...]

Runs the recipe four times with the given overrides (default: SmolLM2-135M + Soft MoA on the generated
arithmetic mix, the leaderboard's micro-batches of 8, 4 steps, fp32 on CPU, one thread), alternating the
baseline and target positions, so a change in machine load mid-measurement hits both alike. The
baseline replaces ``moa_train.train.steps.loss_logits_kwargs`` with one that asks for every position,
the path training took before. Prints each run's tokens/s, the target / every-position ratio of the
summed rates and the final training loss of each (equal up to float rounding), and writes them as JSON
to $LOSS_POSITIONS_OUT if set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT = [
    "model=smollm2_135m",
    "data=arith_mix",
    "experiment=math_soft",
    "trainer.max_steps=4",
    "trainer.micro_batch_size=8",
    "trainer.effective_batch_size=8",
    "trainer.precision=fp32",
    "trainer.cpu_threads=1",
    "trainer.save_every_steps=null",
    "trainer.heatmap_every_steps=null",
    "trainer.eval_every_steps=null",
    "trainer.progress_bar=false",
]


def run(overrides: list[str], targets_only: bool) -> dict:
    from moa_train.train import steps, validation

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from packing_gain import run as train_once  # compose, train in a temporary folder, return the summary

    chosen = steps.loss_logits_kwargs
    every = lambda model, labels: ({}, None)  # noqa: E731  (the baseline: logits at every position)
    steps.loss_logits_kwargs = validation.loss_logits_kwargs = chosen if targets_only else every
    try:
        return train_once(overrides, packing=None)
    finally:
        steps.loss_logits_kwargs = validation.loss_logits_kwargs = chosen


def main(argv: list[str]) -> None:
    overrides = argv or DEFAULT
    runs: dict[str, list[dict]] = {"every position": [], "target positions": []}
    for targets_only in (False, True, False, True):
        summary = run(overrides, targets_only)
        name = "target positions" if targets_only else "every position"
        runs[name].append(
            {
                "tokens_per_s": summary["train/tokens_per_s"],
                "train_seconds": summary["train_seconds"],
                "train_loss": summary["train/loss"],
                "steps": summary["step"],
            }
        )
        last = runs[name][-1]
        print(f"{name}: {last['tokens_per_s']:.0f} tokens/s, train/loss {last['train_loss']:.6f}")
    rate = {name: sum(r["tokens_per_s"] for r in rows) for name, rows in runs.items()}
    speedup = round(rate["target positions"] / rate["every position"], 2)
    results = {**runs, "speedup": speedup, "overrides": overrides}
    print(f"target positions / every position tokens/s: {speedup:.2f}x")
    if os.environ.get("LOSS_POSITIONS_OUT"):
        Path(os.environ["LOSS_POSITIONS_OUT"]).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
