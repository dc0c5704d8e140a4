"""The core of an installed vaefast, in an environment with only its core dependencies (run by .ci/run in a fresh venv).

    python scripts/check_core.py [--other-build CHECKOUT]

Checks that neither matplotlib nor scikit-learn is installed; that the installed vaefast loads its compiled ops and
reports the version of its metadata; that the core (training, estimate, margin_bound, numerical_margin, certify, an
attack, run_sweep and verify_sweep) runs on a small MLP VAE; and that the report and the digits fail with the one-line
error naming their extra (from the library and from the command line). With ``--other-build``: the checkout's in-place
extension, built against another torch, is not loaded (one warning naming both versions) and the reference takes
over. Run it from outside the checkout so that ``import vaefast`` finds the installed package. Exit status 0 when all
holds; an AssertionError says what did not.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

OTHER_BUILD = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vaefast
import torch
from vaefast import ops
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert not vaefast.has_compiled_ops() and len(msgs) == 1, msgs
assert "running torch " + torch.__version__ in msgs[0] and "pip install --no-build-isolation" in msgs[0], msgs[0]
hits = ops.sphere_hits(torch.zeros(2, 5, 3), torch.zeros(2, 3), [1.0])
assert hits.tolist() == [[5], [5]], hits
print(msgs[0])
"""


def check_core(workdir: Path) -> None:
    """Train a small VAE on random points and run every core analysis and a sweep on it."""
    import torch

    import vaefast
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import train

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    model = VAE(VAEConfig(hidden=(32,), latent_dim=4, likelihood="gaussian", gaussian_std=0.2), seed=0)
    train(model, x, epochs=2, batch_size=32, progress=False)
    points = x[:4]
    r = vaefast.auto_radii(model, points, num_samples=200)[-1]  # above every point's r*: robust points to claim
    est = vaefast.estimate_r_robustness(model, points, radii=[r], num_samples=200, seed=0)
    bound = vaefast.margin_bound(model, points, r, estimate=est)
    margin = vaefast.numerical_margin(model, points, r, num_samples=200, steps=10, estimate=est, progress=False)
    cert = vaefast.certify(model, points, r, num_samples=200, estimate=est)
    attack = vaefast.MaxDamageAttack(model, eps=[0.5], steps=5)(points)
    assert bound.bound.shape == margin.margin.shape == cert.radius.shape == (4,)
    assert attack.delta.shape[-3:] == (1, 8, 8)
    db = workdir / "results.db"
    vaefast.run_sweep({"m": model}, points, [r], db, num_samples=100, progress=False)
    checked = vaefast.verify_sweep(db, models={"m": model})
    assert checked.checked > 0, "the sweep made no claim to verify"
    assert checked.passed and checked.version_note is None, (checked.failed, checked.discrepancies)
    print(f"core: r = {r:.3f}, bound {bound.bound.tolist()}, margin {margin.margin.tolist()}, {checked.checked} claims")


def check_missing_extras(workdir: Path) -> None:
    """The report and the digits raise the one-line error naming their extra; the CLI prints it as one line."""
    import vaefast
    from vaefast._extras import MissingExtraError

    calls = {
        "report": lambda: vaefast.report.write_report(workdir / "results.db", workdir / "report"),
        "data": lambda: vaefast.data.load("digits"),
    }
    for extra, call in calls.items():
        try:
            call()
        except MissingExtraError as exc:
            assert "\n" not in str(exc) and f"pip install 'vaefast[{extra}]'" in str(exc), str(exc)
        else:
            raise AssertionError(f"no MissingExtraError without the {extra} extra")
    command = [str(Path(sys.executable).with_name("vaefast")), "report", str(workdir / "results.db")]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err and "pip install 'vaefast[report]'" in err, (done.returncode, err)
    print(f"missing extra: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other-build", type=Path, help="a checkout whose in-place _C was built against another torch")
    args = parser.parse_args()
    for module in ("matplotlib", "sklearn"):
        assert importlib.util.find_spec(module) is None, f"{module} is installed: not a core-only environment"
    import vaefast

    assert "site-packages" in vaefast.__file__, f"not the installed vaefast: {vaefast.__file__}"
    assert vaefast.has_compiled_ops(), "the installed vaefast._C did not load"
    assert metadata.version("vaefast") == vaefast.__version__, (metadata.version("vaefast"), vaefast.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        check_core(Path(tmp))
        check_missing_extras(Path(tmp))
    if args.other_build is not None:
        env = {**os.environ, "PYTHONPATH": str(args.other_build.resolve())}
        done = subprocess.run([sys.executable, "-c", OTHER_BUILD], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        print(f"other build: {done.stdout.strip()}")
    print(f"core-only environment: vaefast {vaefast.__version__} OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
