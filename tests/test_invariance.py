"""Batch invariance: every stochastic public function gives a point the same numbers whatever the batch split.

Each function runs on a batch and on its two halves with the matching global point ids (or ``point_offset``), and
the halves must reproduce the whole:

- bitwise: the random numbers themselves (the max-damage attack's noise, the output attack's ELBO noise, random
  starts, Hutchinson probes), which are keyed by (seed, stream, point id, sample) and computed per point;
- allclose (float64, tight tolerances): everything that passes through the model, whose batched matrix products
  (and batched VJPs) may round differently for a different number of rows; optimiser trajectories may carry that
  last-bit difference along.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from vaefast.attacks import AttackResult, LatentAttack, MaxDamageAttack, OutputAttack
from vaefast.attacks.base import box_offsets
from vaefast.attacks.engine import LoopConfig, random_start, restart_noise
from vaefast.jacobian import _probes, jacobian_frobenius
from vaefast.models import VAE, VAEConfig

torch.set_num_threads(1)

D, LATENT, B = 16, 3, 6
IDS = torch.arange(40, 40 + B)  # global ids far from the batch positions
HALF = B // 2
TOL = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(scope="module")
def model() -> VAE:
    config = VAEConfig(input_shape=(D,), hidden=(24,), latent_dim=LATENT, likelihood="bernoulli")
    return VAE(config, seed=0).double().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return 0.1 + 0.8 * torch.rand(B, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _halves(fn: Callable[[slice], torch.Tensor], axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` on the whole batch, and on its two halves concatenated along the point axis."""
    whole = fn(slice(0, B))
    return whole, torch.cat([fn(slice(0, HALF)), fn(slice(HALF, B))], axis)


def _check_result(run: Callable[[slice], AttackResult], curve: bool = False) -> None:
    """Every per-point field of an attack result from the whole batch equals the one from the halves (allclose)."""
    whole, first, second = run(slice(0, B)), run(slice(0, HALF)), run(slice(HALF, B))
    axis = 1 if curve else 0
    fields = {"delta": whole.delta, "objective": whole.objective, "initial_objective": whole.initial_objective}
    fields.update(whole.extra)
    for name, value in fields.items():
        a = getattr(first, name) if name in ("delta", "objective", "initial_objective") else first.extra[name]
        b = getattr(second, name) if name in ("delta", "objective", "initial_objective") else second.extra[name]
        torch.testing.assert_close(torch.cat([a, b], axis), value, **TOL, msg=name)


# --- the random numbers: bitwise ------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", ["attack-noise", "elbo-noise"])
def test_restart_noise_is_keyed_by_point_id(stream: str) -> None:
    def noise(sl: slice) -> torch.Tensor:
        return restart_noise(IDS[sl], 3, 5, LATENT, 7, stream, torch.float64, torch.device("cpu"))

    whole, halves = _halves(noise)
    assert whole.shape == (B, 3, 5, LATENT) and torch.equal(whole, halves)
    # keyed by the id, not the position in the batch; restarts get different numbers
    assert not torch.equal(noise(slice(HALF, B)), restart_noise(torch.arange(HALF), 3, 5, LATENT, 7, stream,
                                                                torch.float64, torch.device("cpu")))  # fmt: skip
    assert not torch.equal(whole[:, 0], whole[:, 1])


@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("constraint", ["ball", "sphere", "none"])
def test_random_starts_are_keyed_by_point_id(x: torch.Tensor, norm: str, constraint: str) -> None:
    cfg = LoopConfig(norm, constraint, 10, None, 2, "pgd", 3, False)
    lo, hi = box_offsets(x, (0.0, 1.0))
    eps = torch.full((B,), 0.4, dtype=torch.float64)

    def start(sl: slice, restart: int = 1) -> torch.Tensor:
        return random_start(cfg, eps[sl], lo[sl], hi[sl], IDS[sl], restart, D, torch.float64, x.device)

    whole, halves = _halves(start)
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, start(slice(0, B), restart=0))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_probes_are_keyed_by_point_id(probe: str) -> None:
    whole, halves = _halves(lambda sl: _probes(9, LATENT, IDS[sl], 5, probe, torch.device("cpu")), axis=1)
    assert whole.shape == (9, B, LATENT) and torch.equal(whole, halves)
    if probe == "rademacher":
        assert set(whole.unique().tolist()) == {-1.0, 1.0}


# --- the public functions: allclose (batched matrix products) ----------------------------------------------------
@pytest.mark.parametrize("optimizer", ["pgd", "adam", "lbfgsb"])
def test_max_damage_attack(model: VAE, x: torch.Tensor, optimizer: str) -> None:
    steps = 4 if optimizer == "lbfgsb" else 8
    atk = MaxDamageAttack(model, 0.5, mode="mean_var", restarts=2, num_noise_samples=4, steps=steps,
                          optimizer=optimizer, seed=2)  # fmt: skip
    _check_result(lambda sl: atk(x[sl], point_ids=IDS[sl]))


def test_max_damage_curve_on_the_sphere(model: VAE, x: torch.Tensor) -> None:
    atk = MaxDamageAttack(model, [0.3, 0.6], constraint="sphere", restarts=2, num_noise_samples=4, steps=6)
    _check_result(lambda sl: atk(x[sl], point_ids=IDS[sl]), curve=True)


@pytest.mark.parametrize("mode", ["penalised", "budget"])
def test_latent_attack(model: VAE, x: torch.Tensor, mode: str) -> None:
    kwargs = {"lam": 0.05} if mode == "penalised" else {"eps": 0.5}
    target = x.flip(0)  # one target per point: each half gets its own targets
    atk = LatentAttack(model, target, divergence="skl", mode=mode, restarts=2, steps=8, **kwargs)
    _check_result(lambda sl: atk(x[sl], point_ids=IDS[sl], target=target[sl]))


@pytest.mark.parametrize("loss", ["mse", "elbo"])
@pytest.mark.parametrize("mode", ["penalised", "budget"])
def test_output_attack(model: VAE, x: torch.Tensor, loss: str, mode: str) -> None:
    kwargs = {"lam": 0.05} if mode == "penalised" else {"eps": 0.5}
    atk = OutputAttack(model, x[:1], loss=loss, mode=mode, restarts=2, num_noise_samples=4, steps=8, **kwargs)
    _check_result(lambda sl: atk(x[sl], point_ids=IDS[sl]))


def test_output_attack_elbo_noise_follows_the_point_not_the_row(model: VAE, x: torch.Tensor) -> None:
    atk = OutputAttack(model, x[:1], loss="elbo", mode="budget", eps=0.5, num_noise_samples=4, steps=8)
    whole = atk(x, point_ids=IDS)
    second = atk(x[HALF:], point_ids=IDS[HALF:])
    torch.testing.assert_close(second.delta, whole.delta[HALF:], **TOL)
    by_row = atk(x[HALF:])  # default ids arange(3): other noise, so another attack
    assert not torch.allclose(by_row.objective, whole.objective[HALF:], rtol=1e-6, atol=0)


def test_lambda_sweep(model: VAE, x: torch.Tensor) -> None:
    atk = OutputAttack(model, x[:1], loss="elbo", num_noise_samples=4, steps=6)

    def sweep(sl: slice) -> AttackResult:
        return atk.sweep(x[sl], lams=[0.01, 1.0], point_ids=IDS[sl]).result

    _check_result(sweep, curve=True)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_jacobian(model: VAE, x: torch.Tensor, probe: str) -> None:
    enc = model.mean_encoder()

    def estimate(sl: slice) -> torch.Tensor:
        value, se = jacobian_frobenius(enc, x[sl], method="hutchinson", num_probes=16, seed=1, probe=probe,
                                       return_stderr=True, point_offset=int(IDS[sl][0]))  # fmt: skip
        return torch.stack([value, se], 1)

    whole, halves = _halves(estimate)
    torch.testing.assert_close(halves, whole, rtol=1e-12, atol=0)
    chunked = jacobian_frobenius(enc, x, method="hutchinson", num_probes=16, seed=1, probe=probe, chunk_size=4,
                                 point_offset=int(IDS[0]))  # fmt: skip
    torch.testing.assert_close(chunked, whole[:, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("strategy", ["secant", "halving"])
def test_numerical_margin(model: VAE, x: torch.Tensor, strategy: str) -> None:
    """The margin search is per point (its radii, attacks and decisions keyed by the global point id): a batch and its
    halves give every point the same margin, bracket, evidence counts and evaluations (a fixed ``max_radius``, so
    that every split has the same search limits and hence the same Bonferroni divisor)."""
    from vaefast.margin import numerical_margin
    from vaefast.robustness import estimate_r_robustness

    r = float(estimate_r_robustness(model, x, 1.0, num_samples=200).r_star.median())

    def search(sl: slice):
        return numerical_margin(model, x[sl], r, strategy=strategy, max_radius=1.0, num_samples=400, steps=10,
                                tol=0.02, seed=4, point_offset=int(IDS[sl][0]), progress=False)  # fmt: skip

    whole, first, second = search(slice(0, B)), search(slice(0, HALF)), search(slice(HALF, B))
    for name in ("margin", "lower", "upper", "p_hat_delta", "delta"):
        joined = torch.cat([getattr(first, name), getattr(second, name)])
        torch.testing.assert_close(joined, getattr(whole, name), **TOL, equal_nan=True, msg=name)
    assert torch.equal(torch.cat([first.hits_delta, second.hits_delta]), whole.hits_delta)
    flat = [v for ev in whole.evaluations for pair in ev for v in pair]
    assert [v for ev in first.evaluations + second.evaluations for pair in ev for v in pair] == pytest.approx(flat)
    assert bool((whole.margin > 0).any())


# --- a whole sweep: the tolerance the README states -----------------------------------------------------------
COUNTS = ("hits", "num_samples", "p_hat", "ci_low", "ci_high", "p_low", "robust", "clean_decision", "certified",
          "margin", "margin_lower", "margin_upper", "bracketed", "margin_evals", "hits_adv", "num_samples_adv",
          "p_hat_adv", "ci_low_adv", "ci_high_adv")  # fmt: skip
ROUNDED = ("r_star", "bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min",
           "jac_frobenius", "jac_spectral", "jac_whitened_spectral", "cert_global", "cert_local", "max_radius",
           "adv_norm", "ll_clean", "ll_adv")  # fmt: skip


def test_sweep_numbers_across_batch_sizes(tmp_path) -> None:
    """The README's statement ("Determinism"): counts, p̂, intervals and the three margins identical for any batch
    size; the floats of batched matrix products within a relative 1e-5 (δ entries 1e-5, ``ll_drop`` 1e-5 of
    |``ll_clean``|, ``rel_ll_degradation`` 1e-5). The Monte-Carlo draws are fixed by the seed, so on a given machine
    this is decided once: a count moves only if a sample's distance lies within float rounding of r."""
    from vaefast import store
    from vaefast.data import load
    from vaefast.sweep import run_sweep
    from vaefast.training import train

    model = VAE(VAEConfig(input_shape=(1, 8, 8), hidden=(32,), latent_dim=3, likelihood="gaussian", gaussian_std=0.2))
    train(model, load("digits", "train").x, epochs=3, batch_size=64, lr=3e-3, progress=False)
    x = load("digits", "test").x[:6]
    settings = {"num_samples": 256, "attack_eps": [0.2], "margin": {"tol": 0.03, "steps": 8}}
    rows = {}
    for size in (1, 4, 6):
        db = tmp_path / f"b{size}.db"
        run_sweep({"m": model}, x, [0.3, 0.6], db, batch_size=size, progress=False, **settings)
        conn = store.connect(db, readonly=True)
        rows[size] = {r["item_id"]: r for r in store.read_table(conn, "results", blobs=True)}
        conn.close()
    reference = rows[1]
    assert any(r["delta"] is not None for r in reference.values())
    for size in (4, 6):
        for item, row in rows[size].items():
            ref = reference[item]
            assert {c: row[c] for c in COUNTS} == {c: ref[c] for c in COUNTS}, (size, item)
            for column in ROUNDED:
                if ref[column] is None:
                    assert row[column] is None, (size, item, column)
                else:
                    assert row[column] == pytest.approx(ref[column], rel=1e-5, abs=1e-12), (size, item, column)
            if ref["ll_drop"] is not None:
                assert abs(row["ll_drop"] - ref["ll_drop"]) <= 1e-5 * abs(ref["ll_clean"])
                assert abs(row["rel_ll_degradation"] - ref["rel_ll_degradation"]) <= 1e-5
                delta, ref_delta = store.from_blob(row["delta"]), store.from_blob(ref["delta"])
                assert float(abs(delta - ref_delta).max()) <= 1e-5
