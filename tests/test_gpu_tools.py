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
