"""Seconds per point and peak memory of vaefast's four analyses, from the 8x8 MLP to a Stable Diffusion VAE.

Models (``--models``, default all but ``sd-v1-256``):

- ``mlp-8x8``: vaefast's default MLP VAE, trained 10 epochs on the embedded 8x8 digits (points: the test split);
- ``mlp-784``: the 784-512-512-10 MLP VAE of the paper's MNIST experiments, random weights, uniform random 28x28
  images (MNIST is not downloaded);
- ``conv-64``: a conv beta-VAE (beta 4, d = 10) on 64x64 ``shapes``, trained 2 epochs on 2,000 images;
- ``kl-64``: the scaled-down diffusers ``AutoencoderKL`` of issue 20 (block channels 32/64/64, one layer per block,
  0.95 M parameters), random weights, 3x64x64 uniform random images -> 4x16x16 latents (d = 1,024);
- ``sd-v1-256``: ``AutoencoderKL`` with the Stable Diffusion v1 configuration (channels 128/256/512/512, two layers
  per block, 83.7 M parameters), random weights, 3x256x256 images -> 4x32x32 latents (d = 4,096).

Analyses per model, each measured in a fresh subprocess (so the peak memory is its own): ``estimate``
(:func:`vaefast.estimate_r_robustness`, ``--samples`` samples), ``bound`` (:func:`vaefast.margin_bound` on a given
estimate: the Jacobian norms, exact or randomized by ``"auto"``), ``margin`` (:func:`vaefast.numerical_margin`, the
sequential test up to ``--samples`` samples, ``--steps`` attack steps), ``certify`` (``vaefast.certify``; a model
it cannot read is refused: the reason is the row's note) and, on request, ``bound-exact`` (``margin_bound`` with the
exact Jacobian, ``d`` VJPs per point: the randomized path's reference). ``r`` is 1.3 x the median ``r*`` of the
points (a pilot of 64 samples, or ``--samples`` when fewer). Seconds: wall clock per point (process CPU seconds beside
it). Peak memory: the subprocess's peak resident set (``ru_maxrss``; its RSS before the analysis, the imported
libraries, the model and the estimate the analysis reuses, is shown beside it), on a GPU
``torch.cuda.max_memory_allocated`` too.

Run (the CPU table of benchmarks/README.md):
``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_scale.py --json scale.json``;
on a GPU ``--device cuda``. The JSON file is rewritten after every measurement (a crash keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = ("mlp-8x8", "mlp-784", "conv-64", "kl-64", "sd-v1-256")
DEFAULT_MODELS = MODELS[:4]
TASKS = ("estimate", "bound", "margin", "certify", "bound-exact")
DEFAULT_TASKS = TASKS[:4]
KL_CONFIGS = {
    "kl-64": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "sample_size": 64},
    "sd-v1-256": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 256},
}


# --- models and points (rebuilt identically in every subprocess) -------------------------------------------------
def _kl(name: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    cfg = KL_CONFIGS[name]
    blocks = len(cfg["block_out_channels"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, **cfg,
        ).eval()  # fmt: skip


def _trained(name: str, cache: Path) -> torch.nn.Module:
    """The trained vaefast models, trained once (by the parent) and saved in ``cache``."""
    from vaefast import data, models, training

    folder = cache / name
    if (folder / "model.safetensors").is_file():
        return models.load(folder)
    if name == "mlp-8x8":
        model, x, epochs = models.VAE(models.VAEConfig(), seed=0), data.load("digits").x, 10
    else:
        cfg = models.VAEConfig(architecture="conv", input_shape=(1, 64, 64), latent_dim=10, beta=4.0)
        model, x, epochs = models.VAE(cfg, seed=0), data.load("shapes").x[:2000], 2
    training.train(model, x, epochs=epochs, batch_size=64, lr=2e-3, seed=0, progress=False)
    models.save(model, folder)
    return model.eval()


def build(name: str, cache: Path, points: int, device: str) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """``(model, x, description)`` of a benchmark model on ``device``."""
    from vaefast import data, models

    gen = torch.Generator().manual_seed(1)
    if name in KL_CONFIGS:
        model = models.from_diffusers(_kl(name))
        size = KL_CONFIGS[name]["sample_size"]
        x = torch.rand(points, 3, size, size, generator=gen)
    elif name == "mlp-784":
        cfg = models.VAEConfig(input_shape=(1, 28, 28), hidden=(512, 512), latent_dim=10)
        model, x = models.VAE(cfg, seed=0), torch.rand(points, 1, 28, 28, generator=gen)
    else:
        model = _trained(name, cache)
        x = data.load("digits" if name == "mlp-8x8" else "shapes", "test").x[:points]
    model = model.to(device).eval()
    x = x.to(device)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with torch.no_grad():
        d = model.encode(x[:1])[0].shape[1]
    return model, x, f"{params / 1e6:.3g} M params, {'x'.join(map(str, x.shape[1:]))} -> d={d}"


# --- one measurement (in a subprocess) -----------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _certify_fn():
    import vaefast

    fn = vaefast.certify
    return fn if callable(fn) else fn.certify  # the lazy attribute may resolve to the module vaefast/certify.py


def _run(task: str, model, x, r: float, est, args: argparse.Namespace) -> dict:
    """Run one analysis on all points (``est``: the estimate the bound, margin and certificate reuse); returns its
    ``note`` (the Jacobian's method, the bracketed margins, a refusal) and, for the bounds, the Jacobian norms."""
    import vaefast

    if task == "estimate":
        vaefast.estimate_r_robustness(model, x, [r], num_samples=args.samples, seed=0)
        return {"note": ""}
    if task in ("bound", "bound-exact"):
        method = "exact" if task == "bound-exact" else "auto"
        mb = vaefast.margin_bound(model, x, r, estimate=est, jacobian=method, max_memory=args.max_memory)
        norms = ("jac_frobenius", "jac_frobenius_upper", "jac_spectral", "jac_whitened_spectral")
        return {"note": f"jacobian {mb.jac_method}", **{k: getattr(mb, k).tolist() for k in norms}}
    if task == "margin":
        nm = vaefast.numerical_margin(
            model, x, r, num_samples=args.samples, steps=args.steps, estimate=est, progress=False
        )
        return {"note": f"{int(nm.bracketed.sum())}/{len(nm)} bracketed"}
    try:
        _certify_fn()(model, x, r, estimate=est)
    except (ValueError, TypeError) as exc:
        return {"note": f"refused: {exc}"}
    return {"note": "certified radii"}


def worker(args: argparse.Namespace) -> None:
    """Measure ``args.task`` on ``args.model`` and print one JSON line: after a warm-up on the first point, the
    analysis of all points (the estimate it reuses is computed before the clock starts)."""
    import vaefast

    model, x, desc = build(args.model, Path(args.cache), args.points, args.device)
    cuda = x.device.type == "cuda"
    if args.warmup:  # first-call costs are not the analysis's
        est1 = vaefast.estimate_r_robustness(model, x[:1], [args.r], num_samples=args.samples, seed=0)
        _run(args.task, model, x[:1], args.r, est1, args)
    est = vaefast.estimate_r_robustness(model, x, [args.r], num_samples=args.samples, seed=0)
    base = _rss_mib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = _run(args.task, model, x, args.r, est, args)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n = x.shape[0]
    row = {
        "model": args.model, "description": desc, "task": args.task, "points": n, "r": args.r,
        "seconds_per_point": seconds / n, "cpu_seconds_per_point": cpu_seconds / n,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": base,
        "device": str(x.device), "threads": torch.get_num_threads(), **result,
    }  # fmt: skip
    if cuda:
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(row), flush=True)


# --- the parent: pilot r, one subprocess per measurement, the table ------------------------------------------------
def pilot_radius(name: str, cache: Path, points: int, device: str, samples: int) -> float:
    """1.3 x the median r* of the points (``samples`` samples)."""
    import vaefast

    model, x, _ = build(name, cache, points, device)
    est = vaefast.estimate_r_robustness(model, x, [1.0], num_samples=samples, seed=0)
    return float(f"{1.3 * float(est.r_star.median()):.4g}")


def measure(name: str, task: str, r: float, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", name, "--task", task, "--r", str(r),
           "--points", str(args.points_for[name]), "--samples", str(args.samples), "--steps", str(args.steps),
           "--device", args.device, "--cache", args.cache, *([] if args.warmup else ["--no-warmup"]),
           *([] if args.max_memory is None else ["--max-memory", str(args.max_memory)])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"model": name, "task": task, "error": f"exit {proc.returncode}: {tail[0][:300]}"}


def table(rows: list[dict]) -> str:
    lines = ["| model | task | s/point (CPU s) | peak RSS MiB (before) | note |", "|---|---|---:|---:|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['task']} | - | - | {row['error']} |")
            continue
        mem = f"{row['peak_rss_mib']:.0f} ({row['rss_before_mib']:.0f})"
        if "cuda_peak_mib" in row:
            mem += f"; CUDA {row['cuda_peak_mib']:.0f}"
        secs = f"{row['seconds_per_point']:.3g} ({row['cpu_seconds_per_point']:.3g})"
        lines.append(f"| {row['model']} | {row['task']} | {secs} | {mem} | {row['note']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    p.add_argument("--points", type=int, default=None, help="points per model (default 8; 2 for the KL models)")
    p.add_argument("--samples", type=int, default=128, help="Monte-Carlo samples (default 128)")
    p.add_argument("--steps", type=int, default=10, help="attack steps of the margin search (default 10)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-memory", type=int, default=None, help="margin_bound's max_memory in bytes (default: its own)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up run on the first point")
    p.add_argument("--json", default=None, help="write the rows here after every measurement")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    p.add_argument("--cache", default=None, help="folder of the trained models (default: a temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--r", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.cache = args.cache or tempfile.mkdtemp(prefix="bench_scale_")
    args.points_for = {m: args.points or (2 if m in KL_CONFIGS else 8) for m in args.models}
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, device {args.device}, load {os.getloadavg()}")
    rows = []
    for name in args.models:
        r = pilot_radius(name, Path(args.cache), args.points_for[name], args.device, min(64, args.samples))
        for task in args.tasks:
            rows.append(measure(name, task, r, args))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
