#!/usr/bin/env bash
# Build the device kit: the wheels and files that a lent GPU machine (bare, offline; its python3 is
# CPython 3.12 with torch, transformers, accelerate, peft, numpy, pyarrow, ... but no hydra-core,
# omegaconf, datasets, wandb or bitsandbytes) needs to run scripts/gpu_check.sh. Run it here, where the
# package index is reachable, right before the device call: the moa_train wheel is built from this checkout.
#
#   scripts/device_kit.sh                            # .device_kit/{core,quant,wandb} for CPython 3.12
#   scripts/device_kit.sh --python-version 3.11 --out /tmp/kit311   # for a CPython 3.11 rehearsal
#   scripts/device_kit.sh --groups core,quant        # skip the wandb group
#
# Options (all passed on to scripts/device_kit.py):
#   --out DIR              kit folder (default .device_kit, ignored by git)
#   --python-version X.Y   target CPython (default 3.12, the image's)
#   --platform TAG         wheel platform tag, repeatable (default: manylinux x86-64 tags)
#   --groups LIST          core (always), quant (bitsandbytes), wandb
#   --limit-mib N          largest kit one device call may carry (default 60)
# It prints each item's size and the size each device call carries, and exits non-zero over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "error: $PY not found: run \`make setup\` first (the kit is built with the project's environment)" >&2
  exit 2
fi
exec "$PY" scripts/device_kit.py --build-python "$PY" --pins-from "$PY" "$@"
