#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU, its CUDA toolkit and PyTorch already installed and no
# network, build vaefast._C in place for the visible GPU, run the GPU tests and the GPU benchmarks, and write a JSON
# summary (tests passed/failed, each benchmark ratio against its target) plus logs into OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Exit status: 0 when everything ran and passed, 1 on any failure (build, a test, a benchmark, a missing module).
# Without a GPU it builds the CPU kernels, runs the op tests and a CPU smoke run of the benchmarks, and says clearly
# that nothing ran on a GPU. Python modules the machine lacks are installed from VAEFAST_WHEELS (a folder of wheels,
# default ./wheels) when it exists, never from the network. Budget: about 8 minutes (each step has a timeout).
set -uo pipefail
if [[ $# -ne 1 ]]; then echo "usage: scripts/gpu_check.sh OUT_DIR" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
say() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
: >"$OUT/gpu_check.log"
start=$(date +%s)

gpu="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ "$gpu" == "1" ]]; then
  arch="$("$PY" -c 'import torch; print(".".join(map(str, torch.cuda.get_device_capability())))')"
  say "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), compute capability $arch; torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch"
  force=(--force)  # whatever was built before, this build has the CUDA kernels for this GPU
else
  say "no CUDA GPU is visible: building the CPU kernels and running the CPU checks only; NOTHING RAN ON A GPU"
  export FORCE_ONLY_CPU=1
  force=()  # an up-to-date extension is kept
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# 1. Python modules vaefast and its tests need (installed from local wheels only).
missing="$("$PY" - <<'EOF'
import importlib.util
mods = ["numpy", "scipy", "tqdm", "safetensors", "sklearn", "matplotlib", "pytest", "hypothesis", "ninja"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)"
if [[ -n "$missing" ]]; then
  wheels="${VAEFAST_WHEELS:-$ROOT/wheels}"
  if [[ -d "$wheels" ]]; then
    say "installing missing modules from $wheels: $missing"
    pkgs="$(echo "$missing" | sed 's/sklearn/scikit-learn/')"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$wheels" $pkgs >>"$OUT/gpu_check.log" 2>&1 || status=1
  else
    say "missing Python modules: $missing (no wheel folder at $wheels; set VAEFAST_WHEELS)"
    status=1
  fi
fi

# 2. Build in place for the visible GPU (its own temp folder: the normal builds are left alone).
say "building vaefast._C (log: $OUT/build.log)"
if timeout 300 "$PY" setup.py build_ext --inplace "${force[@]}" --build-temp "build/gpu-check" >"$OUT/build.log" 2>&1; then
  "$PY" -c 'import vaefast, sys; print("compiled:", vaefast.has_compiled_ops(), "with CUDA:", vaefast.compiled_with_cuda())' \
    | tee -a "$OUT/gpu_check.log"
else
  say "BUILD FAILED (tail of the log follows)"; tail -40 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"; status=1
fi

# 3. Tests: on a GPU every test marked gpu (the device-parametrised op, estimator, attack, margin and sweep tests);
#    without one the op tests on the CPU.
if [[ "$gpu" == "1" ]]; then selection=(-m gpu tests); else selection=(tests/test_reparam_sample.py tests/test_sphere_hits.py); fi
say "tests: ${selection[*]} (log: $OUT/tests.log)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider "${selection[@]}" --junitxml "$OUT/junit.xml" >"$OUT/tests.log" 2>&1
rc=$?
tail -3 "$OUT/tests.log" | tee -a "$OUT/gpu_check.log"
if [[ $rc -ne 0 && $rc -ne 5 ]]; then status=1; fi

# 4. Benchmarks (ratios to floors measured in the same run).
bench_args=(--json "$OUT/bench.json")
if [[ "$gpu" != "1" ]]; then bench_args+=(--device cpu --small); fi
say "benchmarks (log: $OUT/bench.log)"
if ! timeout 240 "$PY" benchmarks/bench_gpu.py "${bench_args[@]}" >"$OUT/bench.log" 2>&1; then
  say "BENCHMARKS FAILED (tail follows)"; tail -20 "$OUT/bench.log" | tee -a "$OUT/gpu_check.log"; status=1
fi

# 5. The summary.
"$PY" - "$OUT" "$gpu" "$status" "$(( $(date +%s) - start ))" <<'EOF' | tee -a "$OUT/gpu_check.log"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, gpu, status, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
if (out / "junit.xml").exists():
    for suite in ET.parse(out / "junit.xml").getroot().iter("testsuite"):
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        tests["failed"] += f; tests["errors"] += e; tests["skipped"] += s; tests["passed"] += n - f - e - s
bench = json.loads((out / "bench.json").read_text())["results"] if (out / "bench.json").exists() else {}
def get(name, key):
    return bench.get(name, {}).get(key)
ratios = {
    "sphere_hits_fraction_of_read_bandwidth": (get("sphere_hits", "fraction"), ">= 0.80"),
    "reparam_composite_over_op": (get("reparam_sample", "composite_over_op"), "context"),
    "jacobian_op_over_gemm_floor": (get("mlp_jacobian", "op_over_floor"), "<= 1.30"),
    "estimator_decoder_share": (get("estimator", "decoder_share"), ">= 0.85"),
    "estimator_bf16_speedup": (get("estimator", "bf16_speedup"), "context"),
    "estimator_bf16_hits_equal": (get("estimator", "bf16_hits_equal"), "reported"),
    "margin_seconds_per_point": (get("margin", "seconds_per_point"), "reported"),
}
summary = {
    "ran_on_gpu": gpu,
    "ok": status == 0 and tests["failed"] == 0 and tests["errors"] == 0,
    "seconds": seconds,
    "tests": tests,
    "benchmarks": {k: {"value": v, "target": t} for k, (v, t) in ratios.items()},
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
if not gpu:
    print("[gpu_check] NOTHING RAN ON A GPU: these are CPU checks only")
sys.exit(0 if summary["ok"] else 1)
EOF
rc=$?
if [[ $rc -ne 0 ]]; then status=1; fi
say "done in $(( $(date +%s) - start )) s, status $status (summary: $OUT/summary.json)"
exit $status
