#!/usr/bin/env bash
# The prepared GPU check: build vaefast._C for the visible GPU, run the GPU tests and the GPU benchmarks, and write
# OUT_DIR/summary.json after every step (with a verdict per performance target at the end). Every step has its own
# timeout (7 minutes in all); a failing step is recorded and the next one runs. See scripts/gpu_check.py.
#
#   scripts/gpu_check.sh OUT_DIR [--small] [--skip-build]
#
# Exit status: 0 when everything ran and passed, 1 on any failure, 2 on a usage error.
set -uo pipefail
if [[ $# -lt 1 ]]; then echo "usage: scripts/gpu_check.sh OUT_DIR [--small] [--skip-build]" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_check.py" "$@"
