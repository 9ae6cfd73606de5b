#!/usr/bin/env bash
# The GPU check: hardware limits, the transformers backend's rollouts and SFT/mixture steps in
# bfloat16 on one GPU, in a few minutes, written to OUT/gpu_check.json (see scripts/gpu_check.py).
#   scripts/gpu_check.sh OUT [--mode gpu|cpu-tiny] [--model PATH]
#   OUT=dir scripts/gpu_check.sh [...]            (OUT from the environment)
# PYTHON picks the interpreter (default: python3). Needs torch, transformers and PEFT only.
set -euo pipefail
out="${OUT:-}"
if [[ $# -gt 0 && "$1" != --* ]]; then
    out="$1"
    shift
fi
if [[ -z "$out" ]]; then
    echo "usage: scripts/gpu_check.sh OUT [--mode gpu|cpu-tiny] [--model PATH] (or OUT=dir)" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" --out "$out" "$@"
