#!/usr/bin/env bash
# GPU check: every GPU-only code path of moa_train in one run (< 8 minutes on one H100), one JSON out.
# Made for a bare, offline machine whose python already holds torch/transformers/accelerate/peft (the
# lent GPU machines): what it lacks comes from the device kit (scripts/device_kit.sh), installed with
# `pip install --no-index --no-deps --target` into a temporary folder; nothing is fetched, caches start empty.
#
#   env            versions, the GPU, moa_train's requirements met or not, bitsandbytes present or not
#   bench          moa-bench: Llama-3.1-8B shapes (random weights), 8 x 512 tokens, bf16: step time, decode
#                  tokens/s, peak memory of (a)-(f), ratios to PEFT LoRA
#   compiled       moa-bench (b)-(d) eager and under torch.compile (4 layers), ratios to compiled PEFT LoRA
#   generate       greedy generate() with the KV cache == argmax of the full forward, bf16 (and fp32)
#   nf4_lora_pa_prompt, nf4_ffn   moa-train on a 4-bit (nf4) base: LoRA + parallel adapter + prompt experts
#                  (experts=all), then FFN experts with a site router (experts=mixlora); skipped, and said
#                  so in the JSON, where bitsandbytes is not installed (the kit's quant/ group)
#   fsdp1, fsdp1_offload   moa-train launcher=fsdp with 1 process (FSDP2 + NCCL), without / with CPU offload
#   serve          serving engine tokens/s at concurrency 1 and 16, SmolLM2-135M shapes (where moa_train has one)
#
#   scripts/gpu_check.sh --python python3 --kit .device_kit          # lent GPU machine (docs/benchmarks.md)
#   scripts/gpu_check.sh                                             # a GPU machine after `make setup`
#   scripts/gpu_check.sh --device cpu --python /tmp/venv/bin/python --kit /tmp/kit   # CPU sizes
#
# Options: --python PY (default .venv/bin/python, else python3), --kit DIR (repeatable; DIR/*.whl or
# DIR/*/*.whl; without one, PY's environment must hold moa_train), --device cuda|cpu, --out FILE (default
# $OUT/gpu_check.json when $OUT is a folder, else gpu_check.json), --steps a,b (only these),
# --budget-s N (default 450 on cuda, 3600 on cpu: later steps are skipped, not started, once it is spent;
# each step is also cut at its own limit, 8x longer on cpu, where the CPU-sized steps are mostly start-up).
# Exit status 0 when no step failed (skipped steps do not fail); the JSON holds each step's status,
# seconds, result, and the last lines of its log when it failed.
set -u
cd "$(dirname "$0")/.."
PY=""
KITS=()
DEVICE=cuda
JSON=""
ONLY=""
BUDGET=""
usage() {
  echo "usage: $0 [--python PY] [--kit DIR]... [--device cuda|cpu] [--out FILE] [--steps a,b] [--budget-s N]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case "$1" in
    --python) PY=$2 ;;
    --kit) KITS+=("$2") ;;
    --device) DEVICE=$2 ;;
    --out) JSON=$2 ;;
    --steps) ONLY=$2 ;;
    --budget-s) BUDGET=$2 ;;
    *) usage ;;
  esac
  shift 2
done
case "$DEVICE" in cuda | cpu) ;; *) echo "error: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
SCALE=1 DEFAULT_BUDGET=450
[ "$DEVICE" = cpu ] && SCALE=8 DEFAULT_BUDGET=3600
BUDGET=${BUDGET:-$DEFAULT_BUDGET}
case "$BUDGET" in '' | *[!0-9]*) echo "error: --budget-s takes whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! command -v "$PY" > /dev/null; then
  echo "error: python '$PY' not found: pass --python with the interpreter that holds torch" >&2
  exit 2
fi
PY=$(command -v "$PY")
for kit in ${KITS[@]+"${KITS[@]}"}; do
  [ -d "$kit" ] || { echo "error: kit folder $kit not found: build it with scripts/device_kit.sh" >&2; exit 2; }
done
if [ -z "$JSON" ]; then
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then JSON=$OUT/gpu_check.json; else JSON=gpu_check.json; fi
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moa-gpu-check.XXXXXX")
START=$(date +%s)
echo "gpu_check: device=$DEVICE python=$PY work dir $WORK"

# Offline and with empty caches: every model, tokenizer and compiled kernel comes from the kit or is
# made during this run (a cached file would hide a missing one).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export HF_HOME=$WORK/cache/hf MOA_TRAIN_CACHE=$WORK/cache/moa_train XDG_CACHE_HOME=$WORK/cache/xdg
export TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor TRITON_CACHE_DIR=$WORK/cache/triton
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$MOA_TRAIN_CACHE/models"

BIN=$(dirname "$PY")
if [ ${#KITS[@]} -gt 0 ]; then
  WHEELS=()
  MANIFESTS=()
  for kit in "${KITS[@]}"; do
    for w in "$kit"/*.whl "$kit"/*/*.whl; do [ -f "$w" ] && WHEELS+=("$w"); done
    # the SmolLM2 tokenizer, where moa_train looks for it (model.tokenizer=smollm2)
    for t in "$kit"/smollm2-tokenizer "$kit"/*/smollm2-tokenizer; do
      [ -d "$t" ] && cp -r "$t" "$MOA_TRAIN_CACHE/models/smollm2-135m-instruct-tokenizer"
    done
    for m in "$kit"/manifest.json "$kit"/*/manifest.json; do  # built from other sources than this checkout's?
      [ -f "$m" ] && { MANIFESTS+=(--manifest "$m"); "$PY" scripts/gpu_check.py kit-source "$m" || true; }
    done
  done
  [ ${#WHEELS[@]} -gt 0 ] || { echo "error: no wheels under ${KITS[*]}: build the kit with scripts/device_kit.sh" >&2; exit 2; }
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" "${WHEELS[@]}" > "$WORK/install.log" 2>&1; then
    echo "error: installing the kit failed (see below); rebuild it with scripts/device_kit.sh" >&2
    tail -n 20 "$WORK/install.log" >&2
    exit 2
  fi
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  BIN=$WORK/site/bin  # console scripts of the kit, run by $PY
  echo "  kit: ${#WHEELS[@]} wheels installed into $WORK/site"
fi
for script in moa-train moa-bench; do
  [ -x "$BIN/$script" ] || { echo "error: $BIN/$script not found: pass --kit, or --python of an environment with moa_train" >&2; exit 2; }
done

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
record() {  # record NAME STATUS SECONDS REASON
  printf '{"name": "%s", "status": "%s", "seconds": %s, "reason": "%s"}\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.jsonl"
  printf '  %-20s %-8s %6ss  %s\n' "$1" "$2" "$3" "$4"
}
# step NAME MAX_SECONDS COMMAND...: run it (cut at MAX_SECONDS or the remaining budget, whichever is less),
# log to $WORK/NAME.log. A step that writes $WORK/NAME/result.json or summary.json gets it merged into the JSON.
step() {
  local name=$1 max=$(($2 * SCALE))
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped 0 "time budget of ${BUDGET}s spent"
    return 0
  fi
  [ "$max" -gt "$left" ] && max=$left
  mkdir -p "$WORK/$name"
  local t0 rc ms status reason=""
  t0=$(date +%s%N)
  timeout --kill-after=10 "$max" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  status=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=failed reason="timed out after ${max}s"
  elif [ "$rc" -ne 0 ]; then
    status=failed reason="exit status $rc"
  fi
  record "$name" "$status" "$((ms / 1000)).$(printf %03d $((ms % 1000)))" "$reason"
}
skip() { wanted "$1" && record "$1" skipped 0 "$2"; return 0; }

if [ "$DEVICE" = cuda ]; then
  BENCH=(--device cuda --model llama-3.1-8b-arch --batch 8 --seq 512 --base-dtype bfloat16 --quick --no-extras)
  COMPILE_ARGS=(--layers 4)  # the compiled step: 3 Inductor compiles stay short, the shapes per layer are the 8B's
  TRAIN=(trainer.device=cuda trainer.precision=bf16 model.dtype=bfloat16)
else  # the same code paths at CPU sizes
  BENCH=(--device cpu --model tiny --batch 2 --seq 32 --base-dtype bfloat16 --quick --no-extras --decode-tokens 4)
  # Dynamo's capture of every variant, without Inductor's C++ builds (10+ minutes on a busy CPU, and the
  # GPU run uses Triton instead): the CPU run checks that the graphs capture in this environment
  COMPILE_ARGS=(--compile-backend aot_eager)
  TRAIN=(trainer.device=cpu)
fi
RUN=(experiment=tiny final_eval.enabled=false trainer.max_steps=8 "${TRAIN[@]}")
HAVE_BNB=1
"$PY" -c "import bitsandbytes" > /dev/null 2>&1 || HAVE_BNB=0

step env 120 "$PY" scripts/gpu_check.py env --device "$DEVICE" ${MANIFESTS[@]+"${MANIFESTS[@]}"} \
  --out "$WORK/env/result.json"
step bench 260 "$BIN/moa-bench" "${BENCH[@]}" --out "$WORK/bench/result.json"
step generate 90 "$PY" scripts/gpu_check.py generate --device "$DEVICE" --out "$WORK/generate/result.json"
if [ "$HAVE_BNB" = 1 ]; then
  step nf4_lora_pa_prompt 90 "$BIN/moa-train" "${RUN[@]}" experts=all model.quantization=nf4 \
    "hydra.run.dir=$WORK/nf4_lora_pa_prompt"
  step nf4_ffn 90 "$BIN/moa-train" "${RUN[@]}" experts=mixlora router=none model.quantization=nf4 \
    "hydra.run.dir=$WORK/nf4_ffn"
else
  skip nf4_lora_pa_prompt "bitsandbytes is not installed (carry the kit's quant/ group)"
  skip nf4_ffn "bitsandbytes is not installed (carry the kit's quant/ group)"
fi
step fsdp1 90 "$BIN/moa-train" "${RUN[@]}" launcher=fsdp launcher.num_processes=1 "hydra.run.dir=$WORK/fsdp1"
if [ "$DEVICE" = cuda ]; then  # CPU offload of shards, gradients and optimizer state (a CUDA-only option)
  step fsdp1_offload 90 "$BIN/moa-train" "${RUN[@]}" launcher=fsdp launcher.num_processes=1 \
    launcher.cpu_offload=true "hydra.run.dir=$WORK/fsdp1_offload"
else
  skip fsdp1_offload "CPU offload is a CUDA-only option"
fi
# serve: the serving engine's tokens/s at concurrency 1 and 16 on its own frozen base (no checkpoint needed)
if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('moa_train.serve.bench') is None)" 2> /dev/null; then
  if [ "$DEVICE" = cuda ]; then SERVE=(model=smollm2-random device=cuda dtype=bfloat16); else SERVE=(model=tiny device=cpu); fi
  step serve 120 "$PY" -m moa_train.serve.bench "${SERVE[@]}" "concurrency=[1,16]" requests=16 new_tokens=32 \
    "out=$WORK/serve/result.json"
else
  skip serve "this version of moa_train has no serving engine (moa_train.serve.bench)"
fi

# compiled (last: the longest and the one most likely to need a rerun): PEFT LoRA, Soft and Sparse MoA
# eager and under torch.compile in one process (one graph per MoA forward), ratios to the compiled PEFT
# LoRA next to the eager ones, compile seconds per variant
COMPILED=peft_lora_r16,soft_moa,sparse_moa,peft_lora_r16_compiled,soft_moa_compiled,sparse_moa_compiled
step compiled 240 "$BIN/moa-bench" "${BENCH[@]}" ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"} --compile --variants "$COMPILED" \
  --decode-tokens 0 --mem-steps 0 --out "$WORK/compiled/result.json"
rc=0
"$PY" scripts/gpu_check.py merge "$WORK" "$JSON" --device "$DEVICE" --seconds $(($(date +%s) - START)) || rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # every step's full log beside the JSON (the JSON has failures' tails)
  (cd "$WORK" && tar -czf "$OUT/gpu_check_logs.tar.gz" ./*.log) && echo "logs: $OUT/gpu_check_logs.tar.gz"
fi
exit $rc
