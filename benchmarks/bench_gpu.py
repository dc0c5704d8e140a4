"""GPU benchmarks: every number is a ratio to a floor measured in the same run, on the same device.

- ``sphere_hits``: the op against one read of y (``y.sum()``, the bandwidth floor); target: the op reaches
  >= 80% of that read's bandwidth.
- ``reparam_sample``: the op against the eager composite ``mu + exp(logvar / 2) * randn`` (context: the op also
  gives Philox numbers bit-identical to the CPU's).
- ``mlp_jacobian``: the fused ``||J_mu||_F`` op against its own matrix products (forward addmm's, the backward
  products, the dense first-layer Gram product); target: within 1.3x.
- ``estimator``: the share of ``estimate_r_robustness``'s time spent in the decoder forward on the same latents;
  target >= 85%. With ``autocast`` (bf16 / TF32 decoder, distances in float32): speed and the fraction of
  (point, radius) hit counts equal to float32's, within 1% of the samples of them, the fraction of equal robustness
  decisions and the largest p_hat difference.
- ``margin``: ``numerical_margin`` seconds per point on ``margin_points`` MNIST-sized points at one radius, and per
  (point, radius) item at five (784-512-512-10 MLP VAE and its mirror, trained 30 epochs on digits upsampled to 28x28
  and tiled with small shifts, so that its margins bracket: the fraction bracketed is reported).

Each benchmark's numbers are written to ``--json`` as soon as they are measured; a failing benchmark is recorded
with its error and the next one runs.

Run: ``PYTHONPATH=. python benchmarks/bench_gpu.py [--json out.json] [--small]``. Without a visible GPU it says so
and exits 0 (``--device cpu --small`` runs the same code on the CPU at toy sizes: the test suite does that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vaefast import ops


@dataclass(frozen=True)
class Sizes:
    """Problem sizes (MNIST-like by default; ``small`` for a smoke run)."""

    points: int = 256
    samples: int = 1000
    pixels: int = 784
    latent: int = 10
    radii: int = 64
    hidden: tuple[int, ...] = (512, 512)
    margin_points: int = 10_000
    reps: int = 20
    epochs: int = 30  # the margin benchmark's model: trained until its margins bracket

    @classmethod
    def small(cls) -> Sizes:
        return cls(points=8, samples=32, pixels=64, latent=4, radii=4, hidden=(16,), margin_points=6, reps=2, epochs=2)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after one warm-up (CUDA work synchronised)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sphere_hits(device: torch.device, n: Sizes) -> dict[str, float]:
    """``sphere_hits`` time against one read of y; returns times, bandwidths (GB/s) and the fraction of the read's."""
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.rand(n.points, n.samples, n.pixels, generator=g, device=device)
    c = torch.rand(n.points, n.pixels, generator=g, device=device)
    radii = torch.linspace(0.3, 0.5, n.radii, dtype=torch.float64, device=device) * n.pixels**0.5
    t_op = median_seconds(lambda: ops.sphere_hits(y, c, radii), device, n.reps)
    t_read = median_seconds(lambda: y.sum(), device, n.reps)
    gb = y.numel() * y.element_size() / 1e9
    return {"op_s": t_op, "read_s": t_read, "op_gbps": gb / t_op, "read_gbps": gb / t_read, "fraction": t_read / t_op}


def bench_reparam(device: torch.device, n: Sizes) -> dict[str, float]:
    """``reparam_sample`` against ``mu + exp(logvar / 2) * randn`` (the eager composite with torch's generator)."""
    mu = torch.randn(n.points, n.latent, device=device)
    logvar = torch.randn(n.points, n.latent, device=device) * 0.1
    t_op = median_seconds(lambda: ops.reparam_sample(mu, logvar, n.samples, seed=1), device, n.reps)

    def composite() -> torch.Tensor:
        eps = torch.randn(n.points, n.samples, n.latent, device=device)
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps

    t_comp = median_seconds(composite, device, n.reps)
    return {"op_s": t_op, "composite_s": t_comp, "composite_over_op": t_comp / t_op}


def _mlp(sizes: tuple[int, ...], device: torch.device) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers).to(device)


def bench_jacobian(device: torch.device, n: Sizes) -> dict[str, float]:
    """The fused ``mlp_jacobian_frobenius`` against its own GEMMs (forward, backward products, dense Gram)."""
    from vaefast.jacobian import mlp_spec
    from vaefast.ops import first_layer_gram, mlp_jacobian_frobenius

    torch.manual_seed(0)
    sizes = (n.pixels, *n.hidden, n.latent)
    spec = mlp_spec(_mlp(sizes, device))
    weights = [w.detach() for w in spec.weights]
    biases = [b.detach() for b in spec.biases]
    x = torch.rand(n.points, n.pixels, device=device)
    t_op = median_seconds(lambda: mlp_jacobian_frobenius(x, weights, biases, "relu"), device, n.reps)
    gram = first_layer_gram(weights[0])
    m0 = torch.randn(n.points * n.latent, weights[-1].shape[1], device=device) * 0.05

    def gemms() -> torch.Tensor:
        h = x
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            h = torch.addmm(b, h, w.T)
        m = m0
        for w in reversed(weights[1:-1]):
            m = m @ w
        return m @ gram

    t_floor = median_seconds(gemms, device, n.reps)
    return {"op_s": t_op, "gemm_floor_s": t_floor, "op_over_floor": t_op / t_floor}


def mnist_sized_model(device: torch.device, n: Sizes):
    """An MLP VAE ``pixels-hidden-latent`` with the mirrored decoder (Bernoulli), trained a few epochs on digits
    upsampled to ``sqrt(pixels)`` squared; returns the model and the test images at that size."""
    from vaefast.data import load
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import train

    side = int(round(n.pixels**0.5))

    def images(split: str) -> torch.Tensor:
        x = load("digits", split).x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)

    cfg = VAEConfig(input_shape=(1, side, side), hidden=n.hidden, latent_dim=n.latent)
    model = VAE(cfg, seed=0)
    train(model, images("train"), epochs=n.epochs, batch_size=64, lr=1e-3, seed=0, device=device, progress=False)
    return model.to(device).eval(), images("test").to(device)


def tiled_points(x: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` distinct points in [0, 1]: ``x`` repeated with small deterministic shifts and noise."""
    reps = -(-count // x.shape[0])
    g = torch.Generator(device=x.device).manual_seed(1)
    tiled = x.repeat(reps, 1, 1, 1)[:count]
    noise = 0.02 * torch.randn(tiled.shape, generator=g, device=x.device)
    return (tiled + noise).clamp(0, 1)


def bench_estimator(device: torch.device, n: Sizes, model, x: torch.Tensor) -> dict[str, float]:
    """Decoder share of the estimator's time, and the reduced-precision decoder's speed and agreement."""
    from vaefast.robustness import estimate_r_robustness

    x = x[: n.points]
    r_star = estimate_r_robustness(model, x, [1.0], num_samples=n.samples).r_star
    radii = torch.quantile(r_star, torch.tensor([0.25, 0.5, 0.75], dtype=r_star.dtype)).tolist()
    t_est = median_seconds(lambda: estimate_r_robustness(model, x, radii, num_samples=n.samples), device, n.reps)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = ops.reparam_sample(mu, logvar, n.samples, seed=0).reshape(-1, mu.shape[1])
    t_dec = median_seconds(lambda: model.decode(z), device, n.reps)
    out = {"estimate_s": t_est, "decoder_s": t_dec, "decoder_share": t_dec / t_est}
    exact = estimate_r_robustness(model, x, radii, num_samples=n.samples)
    for mode in ("bf16", "tf32"):
        try:
            t = median_seconds(
                lambda m=mode: estimate_r_robustness(model, x, radii, num_samples=n.samples, autocast=m), device, n.reps
            )
        except (TypeError, ValueError) as exc:  # no reduced-precision support (CPU TF32, or an older vaefast)
            out[f"{mode}_skipped"] = str(exc)
            continue
        low = estimate_r_robustness(model, x, radii, num_samples=n.samples, autocast=mode)
        out[f"{mode}_s"] = t
        out[f"{mode}_speedup"] = t_est / t
        out[f"{mode}_hits_equal"] = float((low.hits == exact.hits).double().mean())
        out[f"{mode}_hits_within_1pct"] = float(((low.hits - exact.hits).abs() <= 0.01 * n.samples).double().mean())
        out[f"{mode}_robust_agree"] = float((low.robust == exact.robust).double().mean())
        out[f"{mode}_max_p_hat_diff"] = float((low.p_hat - exact.p_hat).abs().max())
    return out


def bench_margin(device: torch.device, n: Sizes, model, x: torch.Tensor) -> dict[str, float]:
    """``numerical_margin`` (defaults) seconds per point on ``margin_points`` points at one radius, and per (point,
    radius) item at five radii (one attack path per point serves them all), after a warm-up."""
    from vaefast.margin import numerical_margin
    from vaefast.robustness import estimate_r_robustness

    points = tiled_points(x, n.margin_points)
    r_star = estimate_r_robustness(model, x[:64], [1.0], num_samples=200).r_star
    r = 1.5 * float(r_star.median())
    radii = [
        float(v) * 1.2 for v in torch.quantile(r_star, torch.tensor([0.25, 0.5, 0.75, 0.9, 0.95], dtype=r_star.dtype))
    ]
    numerical_margin(model, points[:2], r)  # warm-up
    out: dict[str, float] = {"points": n.margin_points, "r": r}
    for name, rr in (("one", r), ("five", radii)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = numerical_margin(model, points, rr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        items = n.margin_points * (1 if name == "one" else len(radii))
        decided = res.clean == 1
        out[f"{name}_seconds"] = seconds
        out[f"{name}_seconds_per_item"] = seconds / items
        out[f"{name}_bracketed_of_decided"] = float(res.bracketed[decided].double().mean()) if decided.any() else 0.0
        out[f"{name}_undecided"] = float((res.clean == 0).double().mean())
    out["seconds_per_point"] = out["one_seconds_per_item"]
    return out


def run(device: torch.device, n: Sizes, dump=None) -> dict[str, dict[str, float]]:
    """Every benchmark on ``device``, each in turn; a failing one is recorded (``{"error": ...}``) and the next one
    runs; ``dump(results)`` is called after each (the JSON is written as the numbers come).

    Returns:
        ``{name: numbers}``.
    """
    results: dict[str, dict[str, float]] = {}
    state: dict[str, object] = {}

    def model_and_points():
        if "model" not in state:
            state["model"], state["x"] = mnist_sized_model(device, n)
        return state["model"], state["x"]

    steps = {
        "sphere_hits": lambda: bench_sphere_hits(device, n),
        "reparam_sample": lambda: bench_reparam(device, n),
        "mlp_jacobian": lambda: bench_jacobian(device, n),
        "estimator": lambda: bench_estimator(device, n, *model_and_points()),
        "margin": lambda: bench_margin(device, n, *model_and_points()),
    }
    for name, step in steps.items():
        try:
            results[name] = step()
        except Exception as exc:  # recorded; the other benchmarks still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if dump is not None:
            dump(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--small", action="store_true", help="toy sizes (a smoke run)")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA GPU is visible (nothing ran on a GPU)")
        return 0

    def dump(results: dict) -> None:
        summary = {"device": str(device), "name": _device_name(device), "results": results}
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))

    results = run(device, Sizes.small() if args.small else Sizes(), dump)
    print(json.dumps({"device": str(device), "name": _device_name(device), "results": results}, indent=1))
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
