#!/usr/bin/env bash
# Rehearse the device call on this CPU machine: what scripts/gpu_check.sh meets on a lent GPU machine,
# minus the GPU. It builds
#   * an "image": a fresh virtual environment of this machine's python3 holding only torch (2.13.0, the CPU
#     wheel), transformers and accelerate at the image's versions (5.17.0, 1.15.0), and the image packages
#     that moa_train and the kit's wheels need (peft, numpy, pyarrow, pandas, requests, ...: the kit's
#     manifest lists them), nothing else;
#   * the device kit for that Python (scripts/device_kit.sh --python-version X.Y --groups core,quant);
#   * a copy of the working tree (what the device call sends: tracked and untracked-not-ignored files, no
#     ../shared, no .venv) with the kit in it as .device_kit;
# then runs, in that copy, with an empty HOME and PATH, no network (a fresh network namespace where
# `unshare` allows it) and HF_HUB_OFFLINE=1:
#   scripts/gpu_check.sh --device cpu --python <image>/bin/python --kit .device_kit
# and checks its JSON: every step passed except the CUDA-only ones, which must say why they were skipped.
#
#   scripts/gpu_check_rehearsal.sh [WORK_DIR]      # ~10-30 minutes on 2 busy cores; the JSON is WORK_DIR/out
#   REHEARSAL_KIT=/tmp/kit311 scripts/gpu_check_rehearsal.sh /tmp/reh     # reuse a kit built for this Python
# Needs: `make setup` (the kit is built with .venv), access to the package index (for the image and kit).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/moa-rehearsal.XXXXXX")}
SYS_PY=${REHEARSAL_PYTHON:-python3}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
echo "rehearsal in $WORK"

# 1. the image stand-in: torch and the two versions the image pins; the rest follows the kit (step 2)
IMG=$WORK/image
if [ ! -f "$IMG/.done" ]; then
  rm -rf "$IMG"
  "$SYS_PY" -m venv "$IMG"
  "$IMG/bin/python" -m pip install -q --upgrade pip
  "$IMG/bin/python" -m pip install -q torch==2.13.0  # the local CPU wheel (a bare name pulls CUDA wheels)
  "$IMG/bin/python" -m pip install -q transformers==5.17.0 accelerate==1.15.0
  touch "$IMG/.done"
fi
PYV=$("$IMG/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 2. the tree that travels, the kit in it, and what the kit expects from the image
TREE=$WORK/tree/repo
rm -rf "$WORK/tree"
mkdir -p "$TREE"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -f "$f" ] && mkdir -p "$TREE/$(dirname "$f")" && cp -p "$f" "$TREE/$f"
done
if [ -n "${REHEARSAL_KIT:-}" ]; then  # a kit built earlier for this Python
  cp -r "$REHEARSAL_KIT" "$TREE/.device_kit"
else
  scripts/device_kit.sh --python-version "$PYV" --groups core,quant --source "$TREE" --out "$TREE/.device_kit"
fi
# the image packages the kit's wheels need (numpy, pandas, pyarrow, peft, requests, ...), as the image has them
mapfile -t FROM_IMAGE < <("$IMG/bin/python" -c '
import json, sys
need = json.load(open(sys.argv[1]))["image_requirements"]
print("\n".join(n + s for n, s in need.items() if n not in ("torch", "transformers", "accelerate")))
' "$TREE/.device_kit/core/manifest.json")
"$IMG/bin/python" -m pip install -q "${FROM_IMAGE[@]}" "transformers==5.17.0" "accelerate==1.15.0"
for absent in moa_train hydra omegaconf datasets wandb bitsandbytes; do  # what the image lacks must be absent
  if "$IMG/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$absent') is None)"; then
    echo "error: $absent is installed in the image stand-in $IMG: remove $IMG and run again" >&2
    exit 1
  fi
done

# 3. the check, as on the device: bare environment, empty HOME, offline
rm -rf "$WORK/out" "$WORK/home"
mkdir -p "$WORK/out" "$WORK/home"
CHECK=(env -i "HOME=$WORK/home" "PATH=/usr/local/bin:/usr/bin:/bin" "OUT=$WORK/out" "TMPDIR=$WORK"
  "HF_HUB_OFFLINE=1" bash scripts/gpu_check.sh --device cpu --python "$IMG/bin/python" --kit .device_kit)
NET="network reachable"
if unshare -n true 2> /dev/null; then  # no network at all, only a loopback (FSDP's gloo needs it)
  CHECK=(unshare -n sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' sh "${CHECK[@]}")
  NET="no network (unshare -n)"
fi
echo "running gpu_check.sh with $NET"
rc=0
(cd "$TREE" && "${CHECK[@]}") || rc=$?

# 4. what must hold
"$IMG/bin/python" - "$WORK/out/gpu_check.json" "$rc" << 'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
status = {s["name"]: s for s in report["steps"]}
must_pass = ["env", "bench", "generate", "nf4_lora_pa_prompt", "nf4_ffn", "fsdp1", "compiled"]
problems = [f"{n}: {status.get(n, {}).get('status', 'missing')}" for n in must_pass if status.get(n, {}).get("status") != "passed"]
if status.get("fsdp1_offload", {}).get("status") != "skipped":
    problems.append("fsdp1_offload: not skipped on cpu")
if status.get("serve", {}).get("status") == "failed":
    problems.append("serve: failed")
unmet = status.get("env", {}).get("result", {}).get("unmet_requirements")
if unmet:
    problems.append(f"unmet requirements: {unmet}")
if int(sys.argv[2]) != 0 or not report["passed"]:
    problems.append(f"gpu_check.sh exit status {sys.argv[2]}, passed={report['passed']}")
for p in problems:
    print(f"REHEARSAL FAILED: {p}")
print("rehearsal passed" if not problems else "rehearsal failed", f"({report['seconds']:.0f} s of checks)")
sys.exit(1 if problems else 0)
EOF
