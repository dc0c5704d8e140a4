"""The GPU tooling, run the way a machine without a GPU can: the GPU benchmarks' code at toy sizes on the CPU, and
their clean skip when CUDA is asked for but absent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmarks_run_on_the_cpu_at_toy_sizes(tmp_path):
    bench = _bench_gpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--device", "cpu", "--small", "--json", str(tmp_path / "b.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert results["sphere_hits"]["fraction"] > 0 and results["reparam_sample"]["composite_over_op"] > 0
    assert results["mlp_jacobian"]["op_over_floor"] > 0 and 0 < results["estimator"]["decoder_share"]
    assert results["margin"]["points"] == bench.Sizes.small().margin_points
    assert results["margin"]["seconds_per_point"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
def test_gpu_benchmarks_skip_cleanly_without_a_gpu(capsys):
    assert _bench_gpu().main([]) == 0
    assert "no CUDA GPU is visible (nothing ran on a GPU)" in capsys.readouterr().out


def test_gpu_check_script_is_valid_bash_and_needs_an_out_dir():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "usage: scripts/gpu_check.sh OUT_DIR" in res.stderr


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_budget_and_always_reports(tmp_path, monkeypatch):
    """The steps' timeouts add up to at most 7 minutes; every step is recorded in summary.json as it ends, a step that
    fails (a benchmark that crashes) is recorded with its output and the next one still runs, and the verdicts say
    why a target was not run."""
    check = _gpu_check()
    assert sum(check.TIMEOUTS.values()) == check.BUDGET <= 7 * 60
    crash = tmp_path / "benchmarks"
    crash.mkdir()
    (crash / "bench_gpu.py").write_text("import sys; print('boom'); sys.exit(3)\n")
    monkeypatch.setattr(check, "ROOT", tmp_path)  # benchmarks from tmp_path: one crashes, the other is absent
    status = check.main([str(tmp_path / "out"), "--skip-build", "--skip-tests"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = summary["steps"]
    assert status == 1 and not summary["ok"]
    assert steps["bench_gpu"]["status"] == 3 and "boom" in steps["bench_gpu"]["tail"]
    assert "not in this tree" in steps["bench_scale"]["skipped"]
    assert all(v["verdict"] == "not run" for v in summary["verdicts"].values())
    assert {"environment", "wheels", "bench_gpu", "bench_scale", "verdicts", "done"} <= set(steps)
