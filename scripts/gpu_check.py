"""The prepared GPU check (``scripts/gpu_check.sh OUT_DIR`` runs it): on a machine with an NVIDIA GPU, its CUDA
toolkit and PyTorch already installed and no network, build ``vaefast._C`` for the visible GPU, run the GPU tests and
the GPU benchmarks, and report, whatever fails on the way.

Every step has its own timeout (the sum is ``BUDGET`` = 7 minutes); a failing or timed-out step is recorded and the
next one runs; ``OUT_DIR/summary.json`` is rewritten after every step (a crash or a kill keeps what was measured) and
ends with a verdict per performance target: met, missed (with the ratio) or not run (with why).

Steps: the environment (GPU, torch, CUDA, nvcc, the ninja binary); missing Python modules installed one by one from
local wheels (``VAEFAST_WHEELS``, default ``./wheels``; each failure named); the build (``setup.py build_ext`` with
the visible GPU's architecture, falling back to a JIT build with ``torch.utils.cpp_extension.load`` when setuptools
refuses); the GPU tests, file by file with ``-o addopts=`` (files needing a missing plugin are skipped with the
reason); ``benchmarks/bench_gpu.py`` and, when present, ``benchmarks/bench_scale.py`` (each writes its JSON as it
measures).

Run: ``python scripts/gpu_check.py OUT_DIR [--skip-build] [--small]`` (``--small``: toy benchmark sizes; without a
GPU everything runs on the CPU and the summary says nothing ran on a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 420  # seconds in all
TIMEOUTS = {"wheels": 30, "build": 150, "tests": 110, "bench_gpu": 80, "bench_scale": 50}  # sum: BUDGET
MODULES = {  # importable name: wheel name
    "numpy": "numpy", "scipy": "scipy", "tqdm": "tqdm", "safetensors": "safetensors", "pytest": "pytest",
    "ninja": "ninja", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "hypothesis": "hypothesis",
}  # fmt: skip
GPU_TEST_FILES = ("test_reparam_sample.py", "test_sphere_hits.py", "test_jacobian.py", "test_robustness.py",
                  "test_build.py", "test_margin.py", "test_sweep.py", "test_certify.py")  # fmt: skip
TARGETS = {  # name: (benchmark, key, comparison, threshold)
    "sphere_hits >= 80% of the read bandwidth of y": ("sphere_hits", "fraction", ">=", 0.80),
    "Jacobian within 1.3x of its own matrix products": ("mlp_jacobian", "op_over_floor", "<=", 1.30),
    "estimator >= 85% of its time in the decoder": ("estimator", "decoder_share", ">=", 0.85),
}


class Check:
    """The run's state: what each step did, written to ``summary.json`` after every step."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.summary: dict[str, Any] = {"steps": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.t0 = time.perf_counter()

    def record(self, step: str, **fields: Any) -> None:
        self.summary["steps"][step] = fields
        self.summary["seconds"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str))
        print(f"[gpu_check] {step}: {json.dumps(fields, default=str)[:400]}", flush=True)

    def run(self, step: str, cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a command with its timeout, its output in ``OUT/<step>.log``; returns (status, tail of the log)."""
        log = self.out / f"{step}.log"
        try:
            with log.open("w") as fh:
                done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        return rc, log.read_text(errors="replace")[-3000:]


def environment(check: Check) -> bool:
    """GPU, torch, CUDA, nvcc and the ninja binary; returns whether a GPU is visible."""
    import torch

    gpu = torch.cuda.is_available()
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else "")
    nvcc = shutil.which("nvcc") or (f"{cuda_home}/bin/nvcc" if cuda_home else None)
    check.record(
        "environment", gpu=gpu, name=torch.cuda.get_device_name() if gpu else None, torch=torch.__version__,
        cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability())) if gpu else None,
        nvcc=nvcc, ninja_binary=shutil.which("ninja"), python=sys.version.split()[0],
    )  # fmt: skip
    if not gpu:
        print("[gpu_check] no CUDA GPU is visible: CPU checks only; NOTHING RUNS ON A GPU", flush=True)
    return gpu


def wheels(check: Check) -> None:
    """Missing modules, installed one by one from local wheels; each failure named."""
    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    folder = Path(os.environ.get("VAEFAST_WHEELS", ROOT / "wheels"))
    done, failed = [], {}
    deadline = time.perf_counter() + TIMEOUTS["wheels"]
    for module in missing:
        if not folder.is_dir():
            failed[module] = f"no wheel folder at {folder} (set VAEFAST_WHEELS)"
            continue
        left = max(1, int(deadline - time.perf_counter()))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(folder), MODULES[module]]
        rc, tail = check.run(f"wheel-{module}", cmd, left)
        if rc == 0:
            done.append(module)
        else:
            failed[module] = (tail.strip().splitlines() or [f"status {rc}"])[-1]
    check.record("wheels", missing=missing, installed=done, failed=failed)


def build(check: Check, gpu: bool) -> bool:
    """``setup.py build_ext --inplace`` for the visible GPU; a JIT build when it fails; returns whether ``vaefast._C``
    loads afterwards."""
    import torch

    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if gpu:
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        env["FORCE_ONLY_CPU"] = "1"
    started = time.perf_counter()
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--force", "--build-temp", "build/gpu-check"]
    rc, tail = check.run("build", cmd, TIMEOUTS["build"], env)
    how = "setup.py"
    if rc != 0:
        left = max(30, int(TIMEOUTS["build"] - (time.perf_counter() - started)))
        rc, tail = check.run("build-jit", [sys.executable, str(ROOT / "scripts" / "jit_build.py")], left, env)
        how = "jit"
    probe = "import vaefast; print(vaefast.has_compiled_ops(), vaefast.compiled_with_cuda())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True).stdout.split()
    ok = out[:1] == ["True"]
    with_cuda = out[1:2] == ["True"]
    check.record("build", status=rc, how=how, compiled=ok, with_cuda=with_cuda, tail=None if rc == 0 else tail)
    return ok


def tests(check: Check, gpu: bool) -> None:
    """The GPU test files one by one (``-m gpu`` on a GPU, the op tests on the CPU otherwise)."""
    files = GPU_TEST_FILES if gpu else ("test_reparam_sample.py", "test_sphere_hits.py")
    per_file = {}
    deadline = time.perf_counter() + TIMEOUTS["tests"]
    for name in files:
        text = (ROOT / "tests" / name).read_text()
        need = [m for m in ("hypothesis",) if f"import {m}" in text or f"from {m}" in text]
        absent = [m for m in need if importlib.util.find_spec(m) is None]
        if absent:
            per_file[name] = {"skipped": f"needs {', '.join(absent)}"}
            continue
        left = int(deadline - time.perf_counter())
        if left < 5:
            per_file[name] = {"skipped": "the tests' time budget is spent"}
            continue
        xml = check.out / f"junit-{name}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", f"tests/{name}",
               "--junitxml", str(xml), *(["-m", "gpu"] if gpu else [])]  # fmt: skip
        rc, tail = check.run(f"tests-{name}", cmd, left)
        last = tail.strip().splitlines()[-1:] if rc not in (0, 5) else None
        per_file[name] = {"status": rc, **_junit(xml), "tail": last}
        check.record("tests", files=per_file)
    check.record("tests", files=per_file)


def _junit(xml: Path) -> dict[str, int]:
    """passed/failed/errors/skipped of a junit file (zeros when absent)."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            counts["failed"] += f
            counts["errors"] += e
            counts["skipped"] += s
            counts["passed"] += n - f - e - s
    return counts


def _bench_args(step: str, gpu: bool, small: bool) -> list[str]:
    """Each benchmark's options: its device, and sizes that fit its step's timeout."""
    if step == "bench_gpu":
        return ([] if gpu else ["--device", "cpu"]) + (["--small"] if small or not gpu else [])
    models = ["mlp-8x8", "conv-64"] if small or not gpu else ["mlp-8x8", "mlp-784", "conv-64", "kl-64", "sd-v1-256"]
    return ["--device", "cuda" if gpu else "cpu", "--points", "2", "--samples", "64", "--timeout", "20", "--models",
            *models]  # fmt: skip


def benchmarks(check: Check, gpu: bool, small: bool) -> None:
    """bench_gpu.py and (when present) bench_scale.py, each writing its JSON as it measures."""
    for step, script in (("bench_gpu", "bench_gpu.py"), ("bench_scale", "bench_scale.py")):
        path = ROOT / "benchmarks" / script
        if not path.exists():
            check.record(step, skipped=f"benchmarks/{script} is not in this tree")
            continue
        out = check.out / f"{step}.json"
        cmd = [sys.executable, str(path), "--json", str(out), *_bench_args(step, gpu, small)]
        rc, tail = check.run(step, cmd, TIMEOUTS[step], dict(os.environ, PYTHONPATH=str(ROOT)))
        results = json.loads(out.read_text()) if out.exists() else None
        check.record(step, status=rc, timed_out=rc == 124, results=results, tail=None if rc == 0 else tail)


def verdicts(check: Check, gpu: bool) -> None:
    """Per target: met, missed (with the ratio) or not run (with why)."""
    bench = (check.summary["steps"].get("bench_gpu") or {}).get("results") or {}
    results = bench.get("results", {})
    out = {}
    for target, (name, key, op, threshold) in TARGETS.items():
        value = (results.get(name) or {}).get(key)
        if not gpu:
            out[target] = {"verdict": "not run", "why": "no GPU visible"}
        elif value is None:
            why = (results.get(name) or {}).get("error") or "the benchmark did not reach it"
            out[target] = {"verdict": "not run", "why": why}
        else:
            met = value >= threshold if op == ">=" else value <= threshold
            out[target] = {"verdict": "met" if met else "missed", "value": value, "target": f"{op} {threshold}"}
    check.summary["verdicts"] = out
    check.record("verdicts", **{k: v["verdict"] for k, v in out.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--skip-build", action="store_true", help="use the extension as it is")
    p.add_argument("--small", action="store_true", help="toy benchmark sizes")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve())
    gpu = environment(check)
    wheels(check)
    if not args.skip_build:
        build(check, gpu)
    if not args.skip_tests:
        tests(check, gpu)
    benchmarks(check, gpu, args.small)
    verdicts(check, gpu)
    steps = check.summary["steps"]
    failed_tests = any(f.get("failed") or f.get("errors") for f in steps.get("tests", {}).get("files", {}).values())
    ok = not failed_tests and all(s.get("status", 0) in (0, 5) for s in steps.values() if isinstance(s, dict))
    check.summary["ok"], check.summary["ran_on_gpu"] = ok, gpu
    check.record("done", ok=ok, ran_on_gpu=gpu)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
