"""Sound certificates: closed forms of the linear-Gaussian VAE, falsification by attacks and random perturbations on
trained models (ordinary, Lipschitz-constrained, encoder-only Lipschitz), the Lipschitz layers' constants (one per
network), bad inputs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.nn.utils import parametrize

from vaefast.attacks import MaxDamageAttack
from vaefast.certify import certify, encoder_networks, lipschitz_upper_bound
from vaefast.data import load
from vaefast.margin import numerical_margin
from vaefast.models import VAE, VAEConfig, as_vae
from vaefast.robustness import estimate_r_robustness
from vaefast.training import train

torch.set_num_threads(1)


def test_linear_gaussian_closed_form_and_local_equals_global(linear_vae):
    """sigma constant (no scale term) and mu linear: R_cert = sigma Phi^-1(p_low) / ||A||_2 for both methods, below
    the true margin."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = 1.0
    est = estimate_r_robustness(linear_vae, x, [r], num_samples=4000, seed=1)
    glob = certify(linear_vae, x, r, estimate=est)
    loc = certify(linear_vae, x, r, method="local", estimate=est)
    top = float(linear_vae.singular_values()[0])
    expected = torch.tensor([linear_vae.sigma * stats.norm.ppf(float(p)) / top for p in est.ci_low[:, 0]])
    torch.testing.assert_close(glob.radius, expected.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loc.radius, glob.radius, rtol=1e-9, atol=0)
    assert bool((glob.radius < linear_vae.true_margin(r)).all())
    assert bool((glob.lipschitz_log_sigma == 0).all())


ENCODER_ONLY = {"mu": 1.0, "logvar": 1.0}  # an ordinary decoder


@pytest.fixture(scope="module", params=[None, 1.0, ENCODER_ONLY], ids=["ordinary", "lipschitz1", "encoder1"])
def trained(request):
    cfg = VAEConfig(hidden=(64,), latent_dim=4, likelihood="gaussian", gaussian_std=0.2, lipschitz=request.param)
    model = VAE(cfg, seed=0)
    train(model, load("digits").x, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
    x = load("digits", "test").x[:12]
    r = 1.3 * float(estimate_r_robustness(model, x, [1.0], num_samples=400).r_star.median())
    return model.eval(), x, r


def test_certificates_are_never_broken(trained):
    """Falsification: the max-damage attack (sphere at R_cert) and random directions at R_cert never give a fresh
    estimate whose whole interval lies at or below 1/2; local certifies at least as far as global; R_cert stays
    below the numerical margin."""
    model, x, r = trained
    est = estimate_r_robustness(model, x, [r], num_samples=2000, seed=3)
    glob = certify(model, x, r, estimate=est)
    loc = certify(model, x, r, method="local", estimate=est)
    assert bool((loc.radius >= glob.radius * (1 - 1e-9)).all())
    ok = loc.radius > 0
    assert int(ok.sum()) >= 3
    xs, radius = x[ok], loc.radius[ok]
    attack = MaxDamageAttack(model, 1.0, constraint="sphere", steps=40, restarts=2, seed=5)
    deltas = [attack.attack(xs, eps=radius).delta]
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        d = torch.randn(xs.shape, generator=g)
        d = d * (radius / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1).float()
        deltas.append(torch.clamp(xs + d, 0, 1) - xs)  # inside the box: norm <= R_cert
    for delta in deltas:
        fresh = estimate_r_robustness(model, xs, [r], num_samples=2000, delta=delta, seed=11)
        assert not bool((fresh.ci_high[:, 0] <= 0.5).any()), fresh.p_hat[:, 0]
    nm = numerical_margin(model, xs, r, num_samples=500, steps=30, progress=False, seed=3)
    assert bool((radius <= nm.margin + 1e-9).all())


def test_lipschitz_model_round_trip_and_cli(tmp_path, capsys):
    from vaefast.cli import main
    from vaefast.models import load as load_model
    from vaefast.models import save

    model = VAE(VAEConfig(hidden=(16,), latent_dim=2, likelihood="gaussian", gaussian_std=0.2, lipschitz=3.0), seed=1)
    save(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = load_digits_test()[:3]
    torch.testing.assert_close(again.encode(x)[0], model.encode(x)[0])
    assert again.config.lipschitz == 3.0
    per_network = {"mu": 3.0, "logvar": 0.5, "decoder": None}
    model = VAE(VAEConfig(hidden=(16,), latent_dim=2, likelihood="gaussian", lipschitz=per_network), seed=1)
    save(model, tmp_path / "m2")
    again = load_model(tmp_path / "m2")
    assert again.config == model.config and again.config.lipschitz == per_network
    torch.testing.assert_close(again.decode(again.encode(x)[0]), model.decode(model.encode(x)[0]))
    argv = ["train", "--data", "digits", "--hidden", "16", "--latent", "2", "--likelihood", "gaussian",
            "--epochs", "1", "--lipschitz", "1.5", "--iw-samples", "2", "--no-progress", "--out",
            str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    assert load_model(tmp_path / "run").config.lipschitz == 1.5
    assert main([*argv[:-1], str(tmp_path / "enc"), "--lipschitz-decoder", "none"]) == 0
    encoder_only = load_model(tmp_path / "enc")
    assert encoder_only.config.lipschitz == {"mu": 1.5, "logvar": 1.5, "decoder": None}
    assert not any(parametrize.is_parametrized(m) for m in encoder_only.decoder.modules())
    assert all(parametrize.is_parametrized(m) for m in encoder_only.encoder.modules() if isinstance(m, nn.Linear))
    assert main([*argv[:-1], str(tmp_path / "dec"), "--lipschitz-decoder", "6"]) == 0
    assert load_model(tmp_path / "dec").config.lipschitz_of("decoder") == 6.0
    capsys.readouterr()
    for bad in ("abc", "0", "-1", "inf"):
        assert main([*argv[:-1], str(tmp_path / "bad"), "--lipschitz-decoder", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--lipschitz-decoder must be a number > 0 or 'none'" in err, err
    assert main([*argv[:-1], str(tmp_path / "run2"), "--arch", "conv"]) == 2
    assert "lipschitz requires architecture='mlp'" in capsys.readouterr().err


def load_digits_test() -> torch.Tensor:
    return load("digits", "test").x


@pytest.mark.parametrize(
    "lipschitz", [2.0, {"mu": 2.0, "logvar": 0.5}, {"mu": 2.0, "decoder": 3.0}], ids=["all", "encoder", "mu+decoder"]
)
def test_lipschitz_layers_keep_the_constant_asked(lipschitz):
    """Each constrained network keeps its own constant after training (certified bound and measured ratios); an
    unconstrained network is made of ordinary layers (an unconstrained head on the shared trunk: a plain Linear)."""
    cfg = VAEConfig(hidden=(32, 32), latent_dim=4, likelihood="gaussian", gaussian_std=0.2, lipschitz=lipschitz)
    model = VAE(cfg, seed=0)
    train(model, load("digits").x[:512], epochs=3, batch_size=64, lr=3e-3, seed=0, progress=False)
    nets = encoder_networks(model)
    for key, net in (("mu", nets.mean), ("logvar", nets.log_sigma), ("decoder", model.decoder.net)):
        asked = cfg.lipschitz_of(key)
        constrained = [m for m in net.modules() if isinstance(m, nn.Linear) and parametrize.is_parametrized(m)]
        if asked is not None:
            assert float(lipschitz_upper_bound(net)) <= asked * (1 + 1e-5)
        if key == "decoder":
            assert len(constrained) == (0 if asked is None else 3)
            assert any(isinstance(m, nn.ReLU) for m in net) == (asked is None)
        else:  # the trunk is constrained (two layers); the head when asked
            assert len(constrained) == 2 + (asked is not None)
    for lin in [m for m in model.modules() if parametrize.is_parametrized(m)]:  # orthonormal after training
        assert float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2)) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g)
    with torch.no_grad():
        ratio = (nets.mean(a) - nets.mean(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 2.0 * (1 + 1e-5)


class _Encoder(nn.Module):
    def __init__(self, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), extra or nn.Tanh())
        self.mu = nn.Linear(16, 3)
        self.logvar = nn.Linear(16, 3)

    def forward(self, x):
        h = self.trunk(x)
        return self.mu(h), self.logvar(h)


def _adapter(extra=None):
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 64), nn.Unflatten(1, (1, 8, 8)))
    return as_vae(_Encoder(extra), dec, likelihood="gaussian", decoder_output="mean")


def test_as_vae_models_and_bad_inputs():
    x = load("digits", "test").x[:4]
    model = _adapter()
    for method in ("global", "local"):
        cert = certify(model, x, 2.0, method=method, num_samples=200)
        assert cert.radius.shape == (4,) and bool((cert.radius >= 0).all()) and len(cert.to_rows()) == 4
    with pytest.raises(TypeError, match="unsupported layer BatchNorm1d"):
        certify(_adapter(nn.BatchNorm1d(16)), x, 2.0, num_samples=50)
    with pytest.raises(ValueError, match="method"):
        certify(model, x, 2.0, method="exact", num_samples=50)
    conv = VAE(VAEConfig(input_shape=(1, 8, 8), architecture="conv", hidden=(16,), latent_dim=2), seed=0)
    assert math.isfinite(float(certify(conv, x, 2.0, num_samples=50).radius.max()))
    with pytest.raises(TypeError, match="MLP encoders"):
        certify(conv, x, 2.0, method="local", num_samples=50)
    with pytest.raises(ValueError, match="lipschitz requires architecture='mlp'"):
        VAEConfig(input_shape=(1, 8, 8), architecture="conv", lipschitz=1.0)
    with pytest.raises(ValueError, match="even"):
        VAEConfig(hidden=(15,), lipschitz=1.0)
    with pytest.raises(ValueError, match="lipschitz must be"):
        VAEConfig(lipschitz=0.0)


def test_per_network_lipschitz_config():
    """``lipschitz`` as a number (every network), a dict (one constant per network, missing = ordinary) or None;
    one-line errors naming the field or the key."""
    every, per_network = VAEConfig(lipschitz=2), VAEConfig(lipschitz={"mu": 3, "decoder": None})
    assert every.lipschitz == 2.0 and [every.lipschitz_of(k) for k in ("mu", "logvar", "decoder")] == [2.0] * 3
    assert per_network.lipschitz == {"mu": 3.0, "decoder": None}
    assert [per_network.lipschitz_of(k) for k in ("mu", "logvar", "decoder")] == [3.0, None, None]
    assert VAEConfig.from_json(per_network.to_json()) == per_network
    assert VAEConfig().lipschitz_of("decoder") is None
    assert VAEConfig(hidden=(15,), lipschitz={"decoder": None}).lipschitz_of("mu") is None  # nothing constrained
    conv = {"input_shape": (1, 8, 8), "architecture": "conv"}
    bad = [
        ({"lipschitz": {"mu": 1.0, "encoder": 2.0}}, "lipschitz: unknown network(s) ['encoder']"),
        ({"lipschitz": {"logvar": 0}}, "lipschitz['logvar'] must be None or a finite number > 0, got 0"),
        ({"lipschitz": {"decoder": math.inf}}, "lipschitz['decoder'] must be"),
        ({"lipschitz": {"mu": True}}, "lipschitz['mu'] must be"),
        ({"lipschitz": "4"}, "lipschitz must be None, a finite number > 0 or a dict"),
        ({"lipschitz": {"decoder": 1.0}, **conv}, "lipschitz requires architecture='mlp'"),
        ({"lipschitz": {"logvar": 1.0}, "hidden": (16, 15)}, "hidden widths must be even"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            VAEConfig(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="network must be one of"):
        every.lipschitz_of("trunk")


def test_sweep_stores_certificates_and_draws_the_tightness_view(linear_vae, tmp_path):
    from vaefast import analysis, plots, report, store
    from vaefast.sweep import PointSet, run_sweep

    x = torch.rand(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    db = tmp_path / "r.db"
    run_sweep({"lg": linear_vae}, PointSet(x, box=None), [1.2], db, num_samples=512, batch_size=4, progress=False,
              margin={"steps": 25, "mode": "mean", "max_radius": 2.0})  # fmt: skip
    conn = store.connect(db, create=False)
    rows = store.read_table(conn, "results")
    conn.close()
    for row in rows:
        if row["certified"]:
            assert row["cert_global"] == pytest.approx(row["cert_local"], rel=1e-3)  # 12 bisection halvings
            assert 0 < row["cert_global"] <= row["margin"] and row["cert_global"] < linear_vae.true_margin(1.2)
    items = analysis.tightness_items(analysis.load(db))
    assert len(items) == sum(r["certified"] for r in rows) > 0
    summary = analysis.tightness_summary(analysis.load(db))
    assert set(summary) == {"ordinary"} and summary["ordinary"]["n"] == len(items)
    assert summary["ordinary"]["cert_le_margin"] == len(items) and 0 < summary["ordinary"]["cert_over_margin"] < 1
    line = report.format_tightness(summary)[0]
    assert line.startswith(f"sound certificate (ordinary models, {len(items)} items): <= margin on {len(items)}")
    assert line in report.format_headline(analysis.headline(analysis.load(db)))
    assert plots.plot_tightness(analysis.load(db), tmp_path / "t.png").exists()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    width=st.sampled_from([8, 16, 32]),
    activation=st.sampled_from(["relu", "tanh", "softplus", "elu"]),
    lipschitz=st.sampled_from([None, 2.0, {"mu": 2.0, "logvar": 2.0}, {"mu": 1.0}]),
    method=st.sampled_from(["global", "local"]),
)
def test_certificates_hold_on_random_models(seed, width, activation, lipschitz, method):
    """Property: on random small VAEs (ordinary, Lipschitz-constrained, encoder-only or mean-only Lipschitz with an
    ordinary decoder; several activations), neither the
    max-damage attack nor random directions at R_cert give a fresh estimate whose interval lies at or below 1/2."""
    cfg = VAEConfig(hidden=(width,), latent_dim=3, activation=activation, likelihood="gaussian", gaussian_std=0.2,
                    lipschitz=lipschitz)  # fmt: skip
    model = VAE(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 8, 8, generator=g) * 0.6 + 0.2
    r = 1.1 * float(estimate_r_robustness(model, x, [1.0], num_samples=300, seed=seed).r_star.median())
    est = estimate_r_robustness(model, x, [r], num_samples=1000, seed=seed + 1)
    cert = certify(model, x, r, method=method, estimate=est)
    ok = cert.radius > 0
    if not bool(ok.any()):
        return
    xs, radius = x[ok], cert.radius[ok]
    deltas = [MaxDamageAttack(model, 1.0, constraint="sphere", steps=20, seed=seed).attack(xs, eps=radius).delta]
    d = torch.randn(xs.shape, generator=g)
    deltas.append(torch.clamp(xs + d * (radius / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1).float(), 0, 1) - xs)
    for delta in deltas:
        fresh = estimate_r_robustness(model, xs, [r], num_samples=1000, delta=delta, seed=seed + 2)
        assert not bool((fresh.ci_high[:, 0] <= 0.5).any()), (fresh.p_hat[:, 0], radius)
