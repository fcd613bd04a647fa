"""Peak memory per process of Soft MoA training on SmolLM2-135M: bf16 local, nf4 local, FSDP with 2 processes.

Each variant is a short `moa-train` run (its own processes, so each peak is its own); the peaks come from
the runs' summary.json (CPU: the peak resident set, VmHWM, of each process; CUDA: torch's allocator
peak) and are printed as ratios against the bf16 local run of this invocation. Writes one JSON.

    python scripts/memory_scaleout.py                      # CPU, 3 steps of batch 8 x <=128 tokens
    python scripts/memory_scaleout.py --device cuda --out memory.json

Needs the converted SmolLM2 (any `moa-train` run with the default model converts it once) and
bitsandbytes (`make setup`). On 2 CPU cores the three runs take ~3-5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = [
    "experiment=quickstart",
    "model=smollm2_135m",
    "model.dtype=bfloat16",
    "trainer.precision=bf16",
    "trainer.micro_batch_size=4",
    "trainer.effective_batch_size=8",
    "trainer.log_every_steps=1",
    "trainer.save_every_steps=null",
    "trainer.progress_bar=false",
    "data.max_len=128",
    "final_eval.enabled=false",
    "logger=none",
]
VARIANTS = {
    "bf16_local": [],
    "nf4_local": ["model.quantization=nf4"],
    "fsdp2_2proc": ["launcher=fsdp", "launcher.num_processes=2"],
}


def run_variant(name: str, extra: list[str], args: argparse.Namespace, root: Path) -> dict:
    run_dir = root / name
    cmd = [
        shutil.which("moa-train") or str(Path(sys.executable).with_name("moa-train")),
        *COMMON,
        f"trainer.max_steps={args.steps}",
        f"trainer.device={args.device}",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"status": "failed", "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    peaks = summary.get("peak_memory_mb_by_rank") or [summary["peak_memory_mb"]]
    return {
        "status": "completed",
        "processes": len(peaks),
        "peak_mb_per_process": peaks,
        "max_peak_mb": max(peaks),
        "parallelism": summary.get("parallelism"),
        "base_params_per_rank": summary.get("base_params_per_rank"),
        "train_loss": summary.get("train/loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=Path("memory_scaleout.json"))
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moa-memory-") as tmp:
        for name in names:
            print(f"{name} ...", flush=True)
            results[name] = run_variant(name, VARIANTS[name], args, Path(tmp))
    baseline = results.get("bf16_local", {}).get("max_peak_mb")
    print(
        f"\npeak memory per process ({'RSS' if args.device == 'cpu' else 'CUDA allocator'}), SmolLM2-135M, Soft MoA"
    )
    print(
        f"{'variant':<14} {'processes':>9} {'peak MiB per process':>24} {'x bf16 local':>13} {'base elems/rank':>16}"
    )
    for name, r in results.items():
        if r["status"] != "completed":
            print(f"{name:<14} failed: {r['error']}")
            continue
        ratio = r["max_peak_mb"] / baseline if baseline else float("nan")
        r["ratio_vs_bf16_local"] = round(ratio, 3)
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_mb_per_process"])
        print(f"{name:<14} {r['processes']:>9} {peaks:>24} {ratio:>13.2f} {r['base_params_per_rank']:>16,}")
    report = {"device": args.device, "steps": args.steps, "overrides": COMMON, "results": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten: {args.out}")
    return 0 if all(r["status"] == "completed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
