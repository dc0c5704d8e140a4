"""Training benchmarks.

- ``--beta`` (default): the β sweep on digits (test ELBO, KL, mean encoder sigma, active latents, training seconds).
- ``--lipschitz``: seconds per epoch of an ordinary VAE, one with a 2-Lipschitz encoder (the demo's certificates'
  model) and one with every network 2-Lipschitz, on the MNIST-sized MLP 784-512-512-10 (random 28x28 points,
  Bernoulli, batch 128, lr 1e-3) and on the digits demo's recipe (64-128-128-8, Gaussian std 0.2, batch 64, lr 2e-3,
  with the test ELBO reached); each Lipschitz model also with PyTorch's ``orthogonal`` parametrization differentiated
  on every forward (vaefast 0.2's layers; its epoch time extrapolated from ``--old-steps`` steps where it would take
  minutes). The models take turns epoch by epoch (the ratio is the median over rounds of the ratio within a round)
  and seconds per epoch are the fastest epoch, as the machine is shared; one process, one intra-op thread.

Usage: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_training.py [--beta] [--lipschitz]``
Prints markdown tables (the ones in benchmarks/README.md, section "Training").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from vaefast import data
from vaefast.models import VAE, VAEConfig
from vaefast.models.lipschitz import orthonormal_layers
from vaefast.training import evaluate, train

KINDS = {"ordinary": None, "lipschitz encoder": {"mu": 2.0, "logvar": 2.0}, "all lipschitz": 2.0}
RECIPES = {
    "mnist-sized (random)": (
        {"input_shape": (1, 28, 28), "hidden": (512, 512), "latent_dim": 10, "likelihood": "bernoulli"}, 128, 1e-3
    ),
    "digits (demo)": (
        {"hidden": (128, 128), "latent_dim": 8, "likelihood": "gaussian", "gaussian_std": 0.2}, 64, 2e-3
    ),
}  # fmt: skip


def beta_table(epochs: int, likelihoods: list[str], gaussian_std: float) -> None:
    """The digits β sweep (module docstring)."""
    tr, te = data.load("digits"), data.load("digits", "test")
    trn, val = tr.split(0.1, seed=0)
    print("| likelihood | objective | β / TC weight | test ELBO | KL | mean σ | active | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for lik in likelihoods:
        for objective, b in [("beta_vae", 1.0), ("beta_vae", 2.0), ("beta_vae", 4.0), ("beta_vae", 8.0),
                             ("beta_tcvae", 6.0)]:  # fmt: skip
            cfg = VAEConfig(likelihood=lik, gaussian_std=gaussian_std, objective=objective, beta=b, tc_weight=b)
            model = VAE(cfg, seed=0)
            start = time.perf_counter()
            train(model, trn, val, epochs=epochs, batch_size=64, lr=2e-3, progress=False)
            seconds = time.perf_counter() - start
            ev = evaluate(model, te, dataset_size=len(trn))
            with torch.no_grad():
                mu, logvar = model.encode(te.x)
            active = int((mu.var(0) > 0.01).sum())
            sigma = float(torch.exp(0.5 * logvar).mean())
            cells = [lik, objective, f"{b:g}", f"{ev['elbo']:.2f}", f"{ev['kl']:.2f}", f"{sigma:.3f}", active]
            print("| " + " | ".join(map(str, [*cells, f"{seconds:.1f}"])) + " |")


def torch_orthogonal(model: nn.Module) -> nn.Module:
    """``model`` with each orthonormal layer under PyTorch's ``orthogonal`` parametrization instead (vaefast 0.2)."""
    layers = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(layers) == len(list(orthonormal_layers(model)))
    for layer in layers:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        parametrizations.orthogonal(layer)
    return model


def epoch_seconds(model: nn.Module, x: torch.Tensor, batch: int, lr: float, epochs: int, steps: int | None) -> float:
    """Seconds per epoch of :func:`vaefast.train` on ``x``: the fastest of ``epochs`` epochs (the least disturbed by
    other work on a shared machine); with ``steps``, one epoch on the first ``steps`` batches, scaled to ``x``."""
    n = x.shape[0] if steps is None else min(x.shape[0], steps * batch)
    history = train(model, x[:n], epochs=1 if n < x.shape[0] else epochs, batch_size=batch, lr=lr, progress=False)
    return min(history.column("seconds")) * x.shape[0] / n


def _rows(arch: dict) -> list[tuple[str, str, nn.Module]]:
    """(kind, layers, model) of every row of a recipe: the ordinary model first."""
    rows = []
    for kind, lipschitz in KINDS.items():
        for layers in ("vaefast", "torch orthogonal") if lipschitz else ("nn.Linear",):
            model = VAE(VAEConfig(**arch, lipschitz=lipschitz), seed=0)
            rows.append((kind, layers, torch_orthogonal(model) if layers == "torch orthogonal" else model))
    return rows


def lipschitz_table(n: int, rounds: int, digits_epochs: int, old_steps: int) -> None:
    """Seconds per epoch, ordinary vs Lipschitz (module docstring). MNIST size: ``rounds`` rounds of one epoch per model
    in turn (torch orthogonal: once, ``old_steps`` steps), the ratio to the ordinary model the median over rounds of
    the ratio within a round; digits: ``digits_epochs`` epochs per model, the fastest epoch, and the test ELBO."""
    print("| recipe | model | layers | s / epoch | × ordinary | test ELBO |")
    print("|---|---|---|---:|---:|---:|")
    for recipe, (arch, batch, lr) in RECIPES.items():
        rows = _rows(arch)
        if recipe.startswith("digits"):
            x, test = data.load("digits").x, data.load("digits", "test")
            times = [[epoch_seconds(model, x, batch, lr, digits_epochs, None)] for _, _, model in rows]
        else:
            x, test = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)), None
            times = [[] for _ in rows]
            for r in range(rounds):
                for i, (_, layers, model) in enumerate(rows):
                    old = layers == "torch orthogonal"
                    if not old or r == 0:
                        times[i].append(epoch_seconds(model, x, batch, lr, 1, old_steps if old else None))
        for (kind, layers, model), t in zip(rows, times, strict=True):
            ratio = statistics.median(a / b for a, b in zip(t, times[0], strict=False))
            elbo = "-" if test is None else f"{evaluate(model, test, dataset_size=len(x))['elbo']:.2f}"
            note = f" (from {old_steps} steps)" if test is None and layers == "torch orthogonal" else ""
            print(f"| {recipe} | {kind} | {layers} | {min(t):.2f}{note} | {ratio:.2f} | {elbo} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", action="store_true", help="the β sweep table (the default without --lipschitz)")
    parser.add_argument("--lipschitz", action="store_true", help="the ordinary vs Lipschitz epoch-time table")
    parser.add_argument("--epochs", type=int, default=30, help="β sweep: epochs per model")
    parser.add_argument("--likelihoods", nargs="+", default=["bernoulli", "gaussian"])
    parser.add_argument("--gaussian-std", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=9000, help="--lipschitz: random MNIST-sized points")
    parser.add_argument("--rounds", type=int, default=4, help="--lipschitz: rounds of epochs on the MNIST size")
    parser.add_argument("--digits-epochs", type=int, default=40, help="--lipschitz: digits epochs (ELBO reached)")
    parser.add_argument("--old-steps", type=int, default=10, help="--lipschitz: steps timed for torch orthogonal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.lipschitz:
        lipschitz_table(args.n, args.rounds, args.digits_epochs, args.old_steps)
    if args.beta or not args.lipschitz:
        beta_table(args.epochs, args.likelihoods, args.gaussian_std)


if __name__ == "__main__":
    main()
