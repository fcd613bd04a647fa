#!/usr/bin/env bash
# GPU check (< 10 minutes on one GPU), one JSON out:
#   bench     moa-bench --device cuda: Llama-3.1-8B shapes (random weights, no download), 8 x 512 tokens, bf16
#   nf4       moa-train on a 4-bit (nf4) base on CUDA, every expert type
#   fsdp1     moa-train launcher=fsdp with 1 process on CUDA (FSDP2 + NCCL code path); fsdp1_offload with CPU offload
#   generate  greedy generate() with the KV cache == argmax of the full forward, bf16, CUDA
#   compiled  moa-bench (a)-(d) eager and under torch.compile (8 layers on CUDA), compile time per variant
#
#   scripts/gpu_check.sh                      # on a GPU machine, after `make setup`
#   scripts/gpu_check.sh --device cpu         # the same steps at CPU sizes (what CI-like machines can run)
#   scripts/gpu_check.sh --out results.json
# Exit status 0 when every step passed; the JSON holds each step's status, seconds and result.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--out FILE]" >&2; exit 2 ;;
  esac
done
BIN=${BIN:-.venv/bin}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moa-gpu-check.XXXXXX")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=disabled
echo "gpu_check: device=$DEVICE, work dir $WORK"

# step NAME COMMAND...: run it, log to $WORK/NAME.log, record rc and seconds in $WORK/steps.jsonl.
# A step that writes $WORK/NAME/result.json or $WORK/NAME/summary.json gets it merged into the JSON.
step() {
  local name=$1; shift
  mkdir -p "$WORK/$name"
  local start ms rc
  start=$(date +%s%N)
  "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '{"name": "%s", "rc": %d, "seconds": %d.%03d}\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >> "$WORK/steps.jsonl"
  echo "  $name: rc=$rc"
}

if [ "$DEVICE" = cuda ]; then
  BENCH=(--device cuda --model llama-3.1-8b-arch --batch 8 --seq 512 --base-dtype bfloat16 --quick)
  TRAIN=(trainer.device=cuda trainer.precision=bf16 model.dtype=bfloat16)
else  # dry variant: the same code paths at CPU sizes
  BENCH=(--device cpu --model tiny --batch 2 --seq 32 --base-dtype bfloat16 --quick --decode-tokens 4)
  TRAIN=(trainer.device=cpu)
fi
RUN=(experiment=tiny final_eval.enabled=false trainer.max_steps=8 "${TRAIN[@]}")

step bench "$BIN/moa-bench" "${BENCH[@]}" --out "$WORK/bench/result.json"
step nf4 "$BIN/moa-train" "${RUN[@]}" experts=all model.quantization=nf4 "hydra.run.dir=$WORK/nf4"
step fsdp1 "$BIN/moa-train" "${RUN[@]}" launcher=fsdp launcher.num_processes=1 "hydra.run.dir=$WORK/fsdp1"
if [ "$DEVICE" = cuda ]; then  # CPU offload of shards, gradients and optimizer state (a CUDA-only option)
  step fsdp1_offload "$BIN/moa-train" "${RUN[@]}" launcher=fsdp launcher.num_processes=1 launcher.cpu_offload=true \
    "hydra.run.dir=$WORK/fsdp1_offload"
fi
step generate "$BIN/python" scripts/gpu_check.py generate --device "$DEVICE" --out "$WORK/generate/result.json"
# compiled: (a)-(d) eager and under torch.compile in one process (one graph per MoA forward), ratios to the
# compiled PEFT LoRA next to the eager ones, compile seconds per variant; 8 layers on CUDA keep the four
# Inductor compiles short (shapes per layer unchanged)
COMPILED=frozen_base,peft_lora_r16,soft_moa,sparse_moa,frozen_base_compiled,peft_lora_r16_compiled,soft_moa_compiled,sparse_moa_compiled
LAYERS=(); [ "$DEVICE" = cuda ] && LAYERS=(--layers 8)
step compiled "$BIN/moa-bench" "${BENCH[@]}" ${LAYERS[@]+"${LAYERS[@]}"} --compile --variants "$COMPILED" --decode-tokens 0 \
  --mem-steps 0 --out "$WORK/compiled/result.json"
# --- further steps (e.g. compiled variants) go above this line, as `step NAME COMMAND...` ---

"$BIN/python" scripts/gpu_check.py merge "$WORK" "$OUT" --device "$DEVICE"
