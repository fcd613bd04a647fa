"""Training tokens/s with and without data.packing on the same data, measured in one process.

    .venv/bin/python scripts/packing_gain.py [hydra overrides ...]

Runs the recipe twice with the given overrides (default: SmolLM2-135M + Soft MoA on the embedded
commonsense mix, 12 steps of 8 rows, fp32 on CPU): padded rows, then packed rows. Prints each run's
real tokens/s (non-padding tokens per second of training-loop time), real_token_share (real tokens /
tokens computed) and the packed / padded ratio, and writes them as JSON to $PACKING_GAIN_OUT if set.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

DEFAULT = [
    "model=smollm2_135m",
    "data=commonsense_mix",
    "experts=moa_soft",
    "router=soft_swiglu",
    "trainer=smoke",
    "trainer.max_steps=12",
    "trainer.micro_batch_size=8",
    "trainer.effective_batch_size=8",
    "trainer.save_every_steps=null",
    "trainer.heatmap_every_steps=null",
    "trainer.log_every_steps=4",
]


def run(overrides: list[str], packing: bool) -> dict:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import moa_train.cli.main  # noqa: F401  (registers the run-dir resolvers)
    from moa_train.train.recipe import train

    GlobalHydra.instance().clear()
    with initialize_config_module("moa_train.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *overrides,
                f"data.packing={str(packing).lower()}",
                "logger=none",
                "final_eval.enabled=false",
            ],
        )
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as folder:
        return train(cfg, Path(folder))


def main(argv: list[str]) -> None:
    overrides = argv or DEFAULT
    results = {}
    for packing in (False, True):
        summary = run(overrides, packing)
        results["packed" if packing else "padded"] = {
            "tokens_per_s": summary["train/tokens_per_s"],
            "real_token_share": summary["real_token_share"],
            "train_seconds": summary["train_seconds"],
            "steps": summary["step"],
        }
    results["speedup"] = round(results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"], 2)
    results["overrides"] = overrides
    for name in ("padded", "packed"):
        r = results[name]
        print(f"{name}: {r['tokens_per_s']:.0f} real tokens/s, real_token_share {r['real_token_share']:.3f}")
    print(f"packed / padded tokens/s: {results['speedup']:.2f}x")
    if os.environ.get("PACKING_GAIN_OUT"):
        Path(os.environ["PACKING_GAIN_OUT"]).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
