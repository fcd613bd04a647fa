#!/usr/bin/env bash
# fresh_machine_check.sh: does moa_train set up, test and demo on a new machine?
#
#   bash scripts/fresh_machine_check.sh [REPO]      # REPO: a path or URL to clone (default: this checkout)
#
# Clones the committed state of REPO into a new temporary folder (so nothing beside it: no ../shared
# data, no .venv, no runs), points every cache that moa_train and its libraries write at empty
# temporary folders (MOA_TRAIN_CACHE, HOME and so ~/.cache, HF_HOME, XDG_CACHE_HOME, the torch
# compile caches, matplotlib's), then runs `make setup`, `make demo` and `make test` there, as a new
# user would. Python packages still come from the package index configured for pip, as they would on
# any machine. The output ends with a summary (date, commit, time and result of each step, the
# quickstart accuracy, what the cache holds afterwards); the exit status is non-zero if a step
# failed. KEEP=1 keeps the temporary folder for inspection.
set -uo pipefail

SOURCE=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moa-fresh-machine.XXXXXX")
CLONE="$WORK/moa_train"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/home" "$WORK/cache"
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

git clone --quiet "$SOURCE" "$CLONE" || { echo "error: cannot clone $SOURCE"; exit 2; }
COMMIT=$(git -C "$CLONE" log -1 --format='%h %s' | cut -c1-100)

# Every cache moa_train (or a library it drives) writes, empty. PIP_* settings stay: they say where
# packages come from, not what is cached.
export HOME="$WORK/home"
export MOA_TRAIN_CACHE="$WORK/cache/moa_train"
export XDG_CACHE_HOME="$WORK/cache/xdg"
export HF_HOME="$WORK/cache/huggingface"
export TORCHINDUCTOR_CACHE_DIR="$WORK/cache/torchinductor"
export TRITON_CACHE_DIR="$WORK/cache/triton"
export MPLCONFIGDIR="$WORK/cache/matplotlib"
export PIP_NO_CACHE_DIR=1  # no wheel cache from an earlier set-up either
unset VIRTUAL_ENV PYTHONPATH

status=0
summary=()
step() {  # step <name> <command...>: run in the clone, log, time, record
    local name=$1 start end rc
    shift
    echo "== $name: $*"
    start=$(date +%s)
    (cd "$CLONE" && "$@") >"$LOGS/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    tail -n 5 "$LOGS/$name.log"
    summary+=("$(printf '%-6s exit %d in %dm%02ds' "$name" "$rc" $(((end - start) / 60)) $(((end - start) % 60)))")
    [ "$rc" = 0 ] || status=1
    return "$rc"
}

echo "fresh-machine check of $SOURCE in $WORK"
test -e "$WORK/shared" && { echo "error: $WORK/shared exists"; exit 2; }
step setup make setup && step demo make demo && step test make test  # the demo first: its result comes early

tests=$(grep -E '^[0-9]+ (passed|failed)|[0-9]+ passed' "$LOGS/test.log" 2>/dev/null | tail -n 1)
accuracy=$(grep -E 'accuracy: base=' "$LOGS/demo.log" 2>/dev/null | tail -n 1)
cached=$(cd "$MOA_TRAIN_CACHE" 2>/dev/null && find . -mindepth 1 -maxdepth 2 -type d | sort | tr '\n' ' ')

echo
echo "== fresh-machine check summary"
echo "date:     $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:  $(nproc) cores, $(uname -sm), $(python3 --version 2>&1)"
echo "commit:   $COMMIT"
echo "../shared beside the clone: $(test -e "$WORK/shared" && echo yes || echo no)"
printf '%s\n' "${summary[@]}"
echo "tests:    ${tests:-no result}"
echo "demo:     ${accuracy:-no result}"
echo "MOA_TRAIN_CACHE afterwards: ${cached:-empty}"
echo "result:   $([ "$status" = 0 ] && echo PASS || echo FAIL)"
exit "$status"
