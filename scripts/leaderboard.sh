#!/usr/bin/env bash
# Method leaderboard (docs/leaderboard.md): every method of the mixture-of-adapters family that
# moa_train runs - Soft MoA, Sparse MoA, LoRA, MoLoRA, HydraLoRA, Top-K, AdaMoLE, MixLoRA, MoLA, DynMoLE,
# LoRAMoE, MoSLoRA and naive composition - on SmolLM2-135M with the embedded BIG-bench arithmetic mix
# (data=arith_mix), each with its source's learning rate, >= 2 seeds, scored by the trainer's final
# evaluation on the first EVAL_RECORDS held-out items; then the base model on the same items,
# `moa-report` over all sweeps and docs/leaderboard.md (scripts/leaderboard_md.py).
#
#   scripts/leaderboard.sh [OUT_DIR] [extra moa-train overrides ...]
#
# Budget (environment variables, defaults in brackets): STEPS [32] optimizer steps of BATCH [16]
# examples (micro-batches of MICRO [8]), SEEDS [0,125], EVAL_RECORDS [150]. Jobs run seed-major (every
# method with the first seed before the next seed), so a cut-short run still covers every method;
# re-running scripts/leaderboard_md.py OUT_DIR on a partial run publishes what finished. ONLY (a comma
# list of presets) restricts the run to those methods. PARALLEL_SEEDS=1 runs the seeds as concurrent
# processes (logs in OUT_DIR/seed<N>.log), for a machine with a free core per seed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-runs/leaderboard/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
STEPS=${STEPS:-32}
BATCH=${BATCH:-16}
MICRO=${MICRO:-8}
SEEDS=${SEEDS:-0,125}
EVAL_RECORDS=${EVAL_RECORDS:-150}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# One intra-op thread: on a shared 2-core CPU torch's default pool oversubscribes the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# learning rate -> presets. Each method's source recipe: the MoA paper's (blr 6e-3 x batch / 256, its
# baselines included; MixLoRA has no lr in the spec we follow and takes the same rule), MoLA and MoSLoRA
# 3e-4, DynMoLE and LoRAMoE 2e-4.
MOA_LR=$(python3 -c "print(6e-3 * $BATCH / 256)")
LR_GROUPS=(
  "$MOA_LR math_soft,math_sparse,math_lora,math_molora,math_hydralora,math_topk,math_adamole,math_mixlora,math_naive"
  "3e-4 math_mola,math_moslora"
  "2e-4 math_dynmole,math_loramoe"
)

mkdir -p "$OUT"
{
  echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "budget: STEPS=$STEPS BATCH=$BATCH MICRO=$MICRO SEEDS=$SEEDS EVAL_RECORDS=$EVAL_RECORDS PARALLEL_SEEDS=${PARALLEL_SEEDS:-0} OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "extra overrides: $*"
} > "$OUT/budget.txt"

run_seed() {
  local seed=$1 status=0
  for group in "${LR_GROUPS[@]}"; do
    lr=${group%% *}
    presets=${group#* }
    if [ -n "${ONLY:-}" ]; then
      presets=$(tr ',' '\n' <<< "$presets" | grep -xF -f <(tr ',' '\n' <<< "$ONLY") | paste -sd, -)
      [ -n "$presets" ] || continue
    fi
    "$BIN/moa-train" -m \
      seed="$seed" experiment="$presets" \
      model=smollm2_135m data=arith_mix optimizer.lr="$lr" \
      trainer.max_steps="$STEPS" trainer.micro_batch_size="$MICRO" trainer.effective_batch_size="$BATCH" \
      scheduler.warmup_epochs=null scheduler.warmup_steps=3 \
      trainer.save_every_steps=null trainer.heatmap_every_steps=null trainer.progress_bar=false \
      logger=none final_eval.enabled=true final_eval.base=false final_eval.max_records="$EVAL_RECORDS" \
      final_eval.batch_size=64 \
      hydra.sweep.dir="$OUT/seed${seed}_lr${lr}" ${EXTRA[@]+"${EXTRA[@]}"} || status=$?
  done
  [ $status -eq 0 ] || echo "seed $seed: moa-train exited with status $status: the report lists the failed jobs" >&2
}

EXTRA=("$@")
if [ "${PARALLEL_SEEDS:-0}" = 1 ]; then
  # one process per seed (each one intra-op thread): uses one core per seed once the machine is idle
  for seed in ${SEEDS//,/ }; do
    run_seed "$seed" > "$OUT/seed${seed}.log" 2>&1 &
  done
  wait
else
  for seed in ${SEEDS//,/ }; do
    run_seed "$seed"
  done
fi

# The base model (no adapters) on the same held-out items.
"$BIN/moa-eval" checkpoint=null model=smollm2_135m eval=bigbench '~data@eval.data.commonsense_mix' \
  eval.limit="$EVAL_RECORDS" batch_size=64 precision=bf16 router_stats=false \
  output_dir="$OUT/base_model" hydra.run.dir="$OUT/base_model" hydra.output_subdir=null \
  || echo "the base-model evaluation failed" >&2

echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$OUT/budget.txt"
"$BIN/python" scripts/leaderboard_md.py "$OUT"
