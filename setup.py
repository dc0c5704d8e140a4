"""Build vaefast._C: the compiled core (CPU kernels, plus CUDA kernels when a toolkit is found).

Environment switches (same spirit as torchvision / pytorch_scatter):

- ``FORCE_CUDA=1``      build the CUDA kernels even when no GPU is visible (CI, build hosts). Without it the
  CUDA kernels are built only when torch is a CUDA build, a toolkit is found *and* a GPU is visible: a machine
  without a GPU gets the (much faster) CPU-only build.
- ``FORCE_ONLY_CPU=1``  never build CUDA kernels.
- ``CUDA_HOME``         the toolkit; guessed from ``/usr/local/cuda`` when unset or wrong.
- ``TORCH_CUDA_ARCH_LIST`` GPU architectures; defaults to the visible GPUs, else ``8.0;9.0+PTX``.
- ``MAX_JOBS``          parallel compile jobs (ninja).

Beside the extension the build writes ``vaefast/_build.json``: the torch (and CUDA) version it compiled against, which
``vaefast._extension`` compares with the running torch before loading ``_C`` (an extension built against another torch
release is not loaded: the reference implementations take over, with a warning that says how to rebuild). Any change
of torch also forces a rebuild here, where timestamps alone would keep the stale extension.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
BUILD_INFO = "_build.json"  # beside vaefast/_C: what it was compiled against (read by vaefast/_extension.py)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in {"1", "true", "yes", "on"}


def _find_cuda_home() -> str | None:
    """A CUDA toolkit root that really holds ``bin/nvcc`` and the ``cudart`` library.

    ``/usr/local/bin/nvcc`` wrappers make torch guess ``CUDA_HOME=/usr/local``, which then fails at link
    time (``-lcudart`` not found); we check the candidates instead of trusting the guess.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for home in candidates:
        if not home:
            continue
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_rt = any(glob.glob(os.path.join(home, lib, "libcudart*")) for lib in ("lib64", "lib", "targets/*/lib"))
        if has_nvcc and has_rt:
            return home
    return None


def _use_cuda(torch, cuda_sources: list[str]) -> bool:
    """Whether to build the CUDA kernels (a CUDA torch, a GPU or FORCE_CUDA, a toolkit); exits where FORCE_CUDA
    cannot be honoured, and points torch's extension builder at the real toolkit."""
    if _flag("FORCE_CUDA") and not _flag("FORCE_ONLY_CPU") and torch.version.cuda is None:
        sys.exit(f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build.")
    wanted = _flag("FORCE_CUDA") or torch.cuda.is_available()
    if not wanted and not _flag("FORCE_ONLY_CPU") and torch.version.cuda is not None:
        print(
            "vaefast: no GPU visible, building CPU kernels only (FORCE_CUDA=1 builds the CUDA kernels)", file=sys.stderr
        )
    if wanted and not _flag("FORCE_ONLY_CPU") and torch.version.cuda is not None and cuda_sources:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            if _flag("FORCE_CUDA"):
                sys.exit("FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc + libcudart) was found; set CUDA_HOME.")
            print("vaefast: no CUDA toolkit found, building CPU kernels only", file=sys.stderr)
        else:
            os.environ["CUDA_HOME"] = cuda_home
            # torch.utils.cpp_extension read CUDA_HOME at import: point it at the real toolkit.
            import torch.utils.cpp_extension as cpp_ext

            cpp_ext.CUDA_HOME = cuda_home
            if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
                print(f"vaefast: no GPU visible, TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}", file=sys.stderr)
            return True
    return False


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    headers = sorted(glob.glob(os.path.join("csrc", "common", "*.h")))  # a changed header rebuilds the extension

    use_cuda = _use_cuda(torch, cuda_sources)

    # -fno-math-errno / -fno-trapping-math let gcc vectorise sqrt and branch-free selects; neither changes
    # IEEE rounding (no reassociation, no contraction), so host and device results stay bit-identical.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")] + ([("VAEFAST_WITH_CUDA", None)] if use_cuda else [])
    extra_link_args = ["-fopenmp"]
    common = {"depends": headers, "include_dirs": [os.path.join(ROOT, "csrc")], "define_macros": define_macros,
              "extra_link_args": extra_link_args, "py_limited_api": True}  # fmt: skip
    if use_cuda:
        nvcc_flags = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]
        flags = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = CUDAExtension("vaefast._C", sources + cuda_sources, extra_compile_args=flags, **common)
    else:
        ext = CppExtension("vaefast._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext]


def _build_info(ext) -> dict[str, str | None]:
    """What ``ext`` is compiled against: the torch version, and torch's CUDA version when it has CUDA kernels."""
    import torch

    with_cuda = any(source.endswith(".cu") for source in ext.sources)
    return {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None}


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):  # ninja by default; no with_options(): setuptools 77.0 rejects its keyword
        """torch's build_ext, recording the torch it compiled against beside the extension (``_build.json``) and
        rebuilding when that record differs from the installed torch."""

        def run(self) -> None:
            records = []
            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO)
                info = _build_info(ext)
                try:
                    with open(path) as f:
                        self.force = self.force or json.load(f) != info
                except (OSError, ValueError):
                    self.force = True
                records.append((path, info))
            super().run()
            for path, info in records:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(info, f)

    return {"build_ext": BuildExt}


def _license() -> dict[str, str]:
    """MIT, in the form the running setuptools accepts: an SPDX ``license_expression`` from setuptools 77 on (PEP 639),
    the ``license`` field before (``license`` is dynamic in pyproject.toml, so neither rejects the project)."""
    import setuptools

    return {"license_expression": "MIT"} if int(setuptools.__version__.split(".")[0]) >= 77 else {"license": "MIT"}


setup(
    packages=find_packages(include=["vaefast", "vaefast.*"]),
    # VAEFAST_SKIP_BUILD=1: register the package only (the in-place build is done by scripts/bootstrap.sh).
    ext_modules=[] if _flag("VAEFAST_SKIP_BUILD") else _extensions(),
    cmdclass=_cmdclass(),
    **_license(),
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
