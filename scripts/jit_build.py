"""A JIT build of ``vaefast._C`` with ``torch.utils.cpp_extension.load``, for machines whose setuptools refuses
``setup.py`` (``scripts/gpu_check.py`` falls back to it): the same sources, flags and CUDA switch as setup.py; the
library lands beside the package as ``vaefast/_C.so`` with its ``_build.json`` record.

Run: ``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python scripts/jit_build.py`` (``FORCE_ONLY_CPU=1`` for CPU kernels).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    wanted = os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available()
    cuda = os.environ.get("FORCE_ONLY_CPU") != "1" and wanted
    sources = sorted(glob.glob(str(ROOT / "csrc" / "*.cpp")) + glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp")))
    cflags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    if cuda:
        sources += sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
        cflags.append("-DVAEFAST_WITH_CUDA")
    build = ROOT / "build" / "jit"
    build.mkdir(parents=True, exist_ok=True)
    module = load(
        name="_C", sources=sources, extra_include_paths=[str(ROOT / "csrc")], extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--fmad=false", "--expt-relaxed-constexpr", "-DVAEFAST_WITH_CUDA"],
        extra_ldflags=["-fopenmp"], build_directory=str(build), with_cuda=cuda, is_python_module=False, verbose=True,
    )  # fmt: skip
    del module
    for old in glob.glob(str(ROOT / "vaefast" / "_C*.so")):
        os.remove(old)
    shutil.copy(build / "_C.so", ROOT / "vaefast" / "_C.so")
    record = {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None}
    (ROOT / "vaefast" / "_build.json").write_text(json.dumps(record))
    print(f"built vaefast/_C.so ({'with' if cuda else 'without'} CUDA kernels) against torch {torch.__version__}")


if __name__ == "__main__":
    main()
