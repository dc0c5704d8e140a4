#!/usr/bin/env bash
# Sets up everything vaefast needs on a fresh machine and builds the compiled core, incrementally.
#
#   scripts/bootstrap.sh            create/reuse the venv, build vaefast._C in place, install `vaefast`
#   scripts/bootstrap.sh --venv     only print the venv path
#
# The venv lives outside the clone (VAEFAST_VENV, default ~/.cache/vaefast/venv-<hash>) and is keyed by the
# hash of requirements.txt and the Python version, so it is rebuilt exactly when the requirements change.
# Progress goes to stderr; the last line on stdout is the venv path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
key="$( (cat "$ROOT/requirements.txt"; "$PYTHON" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)"
VENV="${VAEFAST_VENV:-$HOME/.cache/vaefast/venv-$key}"
if [[ "${1:-}" == "--venv" ]]; then echo "$VENV"; exit 0; fi

log() { echo "[bootstrap] $*" >&2; }

if [[ ! -f "$VENV/.complete" ]]; then
  log "creating $VENV (torch is a large download/unpack: a few minutes)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2 2>/dev/null || true
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt" >&2
  touch "$VENV/.complete"
fi
PY="$VENV/bin/python"

# A toolkit where the machine's nvcc wrapper would mislead torch (see setup.py); harmless elsewhere.
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# The in-place build has its own temporary folder per variant (CPU-only or with CUDA kernels), so `pip install .`
# (build/temp.*) and a switch of FORCE_CUDA do not invalidate each other's objects; a variant change forces a relink
# of vaefast/_C*.so. Compiler output goes to a log file, shown on failure.
gpu="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
variant="cpu"
if [[ "${FORCE_ONLY_CPU:-0}" != "1" && ( "${FORCE_CUDA:-0}" == "1" || "$gpu" == "1" ) ]]; then variant="cuda"; fi
mkdir -p "$ROOT/build"
stamp="$ROOT/build/inplace.variant"
force=()
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$variant" ]]; then force=(--force); fi
buildlog="$ROOT/build/inplace-$variant.log"
log "building vaefast._C ($variant kernels, incremental; compiler output in $buildlog)"
if ! (cd "$ROOT" && "$PY" setup.py build_ext --inplace --build-temp "build/inplace-$variant" "${force[@]}" \
      >"$buildlog" 2>&1); then
  cat "$buildlog" >&2
  log "build failed (log above: $buildlog)"
  exit 1
fi
echo "$variant" >"$stamp"

# Register the package (and the `vaefast` command) in the venv, pointing at this tree.
where="$(cd / && "$PY" -c 'import os, vaefast; print(os.path.dirname(os.path.dirname(vaefast.__file__)))' 2>/dev/null || true)"
if [[ "$where" != "$ROOT" ]]; then
  log "installing vaefast (editable) from $ROOT"
  (cd "$ROOT" && VAEFAST_SKIP_BUILD=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps \
      --config-settings editable_mode=compat -e . >&2)
fi
echo "$VENV"
