#!/usr/bin/env bash
# Small-scale reproduction of the paper's comparison (docs/experiments.md, "Small-scale reproduction"):
# {Soft MoA, Sparse MoA, LoRA r16, MoLoRA, naive composition} x seeds {0, 125, 1225} on SmolLM2-135M
# with the generated arithmetic mix (2-/3-digit add, sub, mul), 32 steps each, scored on
# the first 150 items of its held-out split (all six tasks) by the trainer's final evaluation (the
# evaluator moa-eval uses), then the base model alone on the same items, then `moa-report`.
# About an hour on 2 CPU cores.
#
#   scripts/repro_small.sh [SWEEP_DIR] [extra moa-train overrides ...]
#
# Jobs run seed-major (every method with seed 0 first), so a cut-short sweep still covers every
# method; `moa-report SWEEP_DIR` works on a partial sweep and lists the failed or missing jobs.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SWEEP=${1:-runs/repro_small/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# One intra-op thread: on a 2-core machine shared with other work, torch's default thread pool
# oversubscribes the cores and trains several times slower. Set OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$BIN/moa-train" -m \
  seed=0,125,1225 \
  experiment=math_soft,math_sparse,math_lora,math_molora,math_naive \
  model=smollm2_135m data=arith_mix \
  trainer.max_steps=32 trainer.micro_batch_size=16 trainer.effective_batch_size=16 \
  optimizer.lr=2e-3 scheduler.warmup_epochs=null scheduler.warmup_steps=3 \
  trainer.save_every_steps=null trainer.heatmap_every_steps=null trainer.progress_bar=false \
  logger=none final_eval.enabled=true final_eval.base=false final_eval.max_records=150 \
  final_eval.batch_size=64 \
  hydra.sweep.dir="$SWEEP" "$@"
status=$?
[ $status -eq 0 ] || echo "moa-train exited with status $status: the report below lists the failed jobs" >&2

# The base model (no adapters) on the same held-out items, for the comparison line.
"$BIN/moa-eval" checkpoint=null model=smollm2_135m eval=bigbench '~data@eval.data.commonsense_mix' \
  eval.limit=150 batch_size=64 precision=bf16 router_stats=false \
  output_dir="$SWEEP/base_model" hydra.run.dir="$SWEEP/base_model" hydra.output_subdir=null \
  || echo "the base-model evaluation failed" >&2

"$BIN/moa-report" "$SWEEP"
