"""Training tokens/s with and without data.packing on the same data, measured in one process.

    .venv/bin/python scripts/packing_gain.py [hydra overrides ...]
    .venv/bin/python scripts/packing_gain.py --share [hydra overrides ...]

``--share`` trains nothing: it encodes the whole training split and prints the real-token share of an
epoch of padded micro-batches (in the epoch-0 order of ``data.seed``) and of packed rows, and the ratio
of the tokens each computes (seconds; the tokenizer only).

Runs the recipe four times with the given overrides (default: SmolLM2-135M + Soft MoA on the embedded
commonsense mix, 4 steps of 4 rows, fp32 on CPU), alternating padded and packed rows (so a change in
machine load mid-measurement hits both alike). Prints each run's real tokens/s (non-padding tokens per
second of training-loop time), real_token_share (real tokens / tokens computed) and the packed /
padded ratio of the summed rates, and writes them as JSON to $PACKING_GAIN_OUT if set.
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
    "trainer.max_steps=4",
    "trainer.micro_batch_size=4",
    "trainer.effective_batch_size=4",
    "trainer.save_every_steps=null",
    "trainer.heatmap_every_steps=null",
    "trainer.log_every_steps=2",
]


def run(overrides: list[str], packing: bool | None) -> dict:
    """Train with ``overrides`` in a temporary folder (no logger, no final eval) and return the summary;
    ``packing`` sets data.packing (None: as the overrides leave it)."""
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
                *([] if packing is None else [f"data.packing={str(packing).lower()}"]),
                "logger=none",
                "final_eval.enabled=false",
            ],
        )
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as folder:
        return train(cfg, Path(folder))


def share(overrides: list[str]) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import moa_train.cli.main  # noqa: F401  (registers the run-dir resolvers)
    from moa_train.data import encode_dataset, epoch_order, load_splits
    from moa_train.data.packing import pack_examples
    from moa_train.models.base import load_tokenizer

    GlobalHydra.instance().clear()
    with initialize_config_module("moa_train.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    dc, micro = cfg.data, int(cfg.trainer.micro_batch_size)
    mc = cfg.model
    tokenizer = load_tokenizer(mc.get("tokenizer") or (mc.name_or_path if mc.source == "hub" else "smollm2"))
    examples, _ = encode_dataset(
        load_splits(dc)["train"], tokenizer, int(dc.max_len), template=str(dc.template)
    )
    lengths = [len(e["input_ids"]) for e in examples]

    def computed(order: list[int], sizes: list[int]) -> int:
        return sum(
            len(order[i : i + micro]) * max(sizes[j] for j in order[i : i + micro])
            for i in range(0, len(order), micro)
        )

    padded = computed(epoch_order(len(examples), int(dc.seed), 0), lengths)
    rows = [len(r["input_ids"]) for r in pack_examples(examples, int(dc.max_len))]
    packed = computed(epoch_order(len(rows), int(dc.seed), 0), rows)
    print(
        f"data={dc.name} max_len={dc.max_len}: {len(examples)} examples (mean {sum(lengths) / len(lengths):.0f} tokens) "
        f"in micro-batches of {micro}: padded real_token_share {sum(lengths) / padded:.3f}; packed into {len(rows)} "
        f"rows: {sum(rows) / packed:.3f}; tokens computed per epoch, padded / packed: {padded / packed:.2f}x"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--share"]:
        share(argv[1:] or DEFAULT)
        return
    overrides = argv or DEFAULT
    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    for packing in (False, True, False, True):
        summary = run(overrides, packing)
        name = "packed" if packing else "padded"
        runs[name].append(
            {
                "tokens_per_s": summary["train/tokens_per_s"],
                "real_token_share": summary["real_token_share"],
                "train_seconds": summary["train_seconds"],
                "steps": summary["step"],
            }
        )
        last = runs[name][-1]
        print(
            f"{name}: {last['tokens_per_s']:.0f} real tokens/s, real_token_share {last['real_token_share']:.3f}"
        )
    rate = {name: sum(r["tokens_per_s"] for r in rows) for name, rows in runs.items()}
    results = {**runs, "speedup": round(rate["packed"] / rate["padded"], 2), "overrides": overrides}
    print(f"packed / padded tokens/s: {results['speedup']:.2f}x")
    if os.environ.get("PACKING_GAIN_OUT"):
        Path(os.environ["PACKING_GAIN_OUT"]).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
