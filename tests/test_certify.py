"""Sound certificates end to end: the call the README writes, the closed forms of the linear-Gaussian VAE with the
one-sided Clopper–Pearson limit (per point and joint), the estimate's binding, falsification by attacks and fresh
estimates on trained models (ordinary, Lipschitz-constrained, encoder-only Lipschitz), the Lipschitz layers'
constants, a user's plain encoder, refusals, the sweep's stage, caching, devices. Exact falsification per op class:
tests/test_certification_falsify.py; the op rules: tests/test_certification_rules.py."""

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

import vaefast
from vaefast.attacks import MaxDamageAttack
from vaefast.certification import CertificationRefused, EncoderCertifier, certify, lipschitz_constant
from vaefast.data import load
from vaefast.margin import numerical_margin
from vaefast.models import VAE, VAEConfig, as_vae
from vaefast.robustness import estimate_r_robustness
from vaefast.sweep.spec import SweepSpec, WorkUnit
from vaefast.sweep.stages import UnitContext, certificates, estimate, mc_seed
from vaefast.training import train

torch.set_num_threads(1)


def test_the_readme_call_and_the_linear_gaussian_closed_form(linear_vae):
    """``vaefast.certify(model, x, r)`` as the README writes it. With sigma constant and mu linear both methods give
    ``R = sigma Phi^-1(p_low) / ||A||_2``, ``p_low`` the one-sided Clopper–Pearson limit (Bonferroni over the batch
    with ``joint=True``), below the true margin."""
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = 1.0
    plain = vaefast.certify(linear_vae, x, r)
    est = estimate_r_robustness(linear_vae, x, [r], num_samples=4000, seed=1)
    glob = vaefast.certify(linear_vae, x, r=r, method="global", confidence=0.95, estimate=est)
    loc = vaefast.certify(linear_vae, x, r=r, method="local", confidence=0.95, estimate=est)
    joint = vaefast.certify(linear_vae, x, r, estimate=est, joint=True)
    top = float(linear_vae.singular_values()[0])
    k = est.hits[:, 0].numpy()
    for cert, alpha in ((glob, 0.05), (loc, 0.05), (joint, 0.01)):
        p_low = torch.tensor(stats.beta.ppf(alpha, k, 4000 - k + 1), dtype=torch.float64)
        torch.testing.assert_close(cert.p_low, p_low, rtol=1e-12, atol=0)
        expected = linear_vae.sigma * torch.special.ndtri(p_low) / top
        torch.testing.assert_close(cert.radius, expected, rtol=1e-6, atol=0)
        assert bool((cert.radius < linear_vae.true_margin(r)).all()) and bool((cert.lipschitz_log_sigma == 0).all())
    assert bool((joint.radius < glob.radius).all()) and joint.joint and not glob.joint
    assert plain.radius.shape == (5,) and plain.method == "global" and len(plain.to_rows()) == 5
    assert vaefast.certify is certify


def test_a_reused_estimate_must_be_of_this_model_and_these_points(linear_vae):
    from vaefast.testing import LinearGaussianVAE

    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = estimate_r_robustness(linear_vae, x, [1.0], num_samples=200)
    with pytest.raises(ValueError, match="another model, other points or another delta"):
        certify(LinearGaussianVAE(seed=1), x, 1.0, estimate=est)
    with pytest.raises(ValueError, match="another model, other points or another delta"):
        certify(linear_vae, x + 0.1, 1.0, estimate=est)
    moved = estimate_r_robustness(linear_vae, x, [1.0], num_samples=200, delta=torch.full_like(x, 0.1))
    with pytest.raises(ValueError, match="another model, other points or another delta"):
        certify(linear_vae, x, 1.0, estimate=moved)
    with pytest.raises(ValueError, match="no column for r=2.0"):
        certify(linear_vae, x, 2.0, estimate=est)


ENCODER_ONLY = {"mu": 1.0, "logvar": 1.0}  # an ordinary decoder


@pytest.fixture(scope="module", params=[None, 1.0, ENCODER_ONLY], ids=["ordinary", "lipschitz1", "encoder1"])
def trained(request):
    cfg = VAEConfig(hidden=(64,), latent_dim=4, likelihood="gaussian", gaussian_std=0.2, lipschitz=request.param)
    model = VAE(cfg, seed=0)
    train(model, load("digits").x, epochs=6, batch_size=64, lr=3e-3, seed=0, progress=False)
    x = load("digits", "test").x[:10]
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
    x = load("digits").x[:4]
    nets = {"mu": lambda t: model.encode(t)[0], "logvar": lambda t: model.encoder(t)[1], "decoder": model.decoder}
    modules = {"mu": model.encoder, "logvar": model.encoder, "decoder": model.decoder}
    for key, net in nets.items():
        asked = cfg.lipschitz_of(key)
        example = x if key != "decoder" else model.encode(x)[0].detach()
        constant = lipschitz_constant(net, model, example)
        mods = modules[key].modules() if key == "decoder" else [*model.encoder.trunk.modules(),
                                                                 *getattr(model.encoder, key).modules()]  # fmt: skip
        constrained = [m for m in mods if isinstance(m, nn.Linear) and parametrize.is_parametrized(m)]
        if asked is not None:
            assert constant <= asked * (1 + 1e-5)
        if key == "decoder":
            assert len(constrained) == (0 if asked is None else 3)
            assert any(isinstance(m, nn.ReLU) for m in model.decoder.net) == (asked is None)
        else:  # the trunk is constrained (two layers); the head when asked
            assert len(constrained) == 2 + (asked is not None)
    for lin in [m for m in model.modules() if parametrize.is_parametrized(m)]:  # orthonormal after training
        assert float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2)) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g)
    with torch.no_grad():
        ratio = (model.encode(a)[0] - model.encode(b)[0]).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 2.0 * (1 + 1e-5)


class _UserEncoder(nn.Module):
    """A plain PyTorch encoder as most VAEs name it (no vaefast names)."""

    def __init__(self, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), extra or nn.LeakyReLU(0.2), nn.Linear(16, 16),
                                  nn.ELU())  # fmt: skip
        self.fc_mu = nn.Linear(16, 3)
        self.fc_var = nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return self.fc_mu(h), self.fc_var(h)


def _user_model(extra=None):
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 64), nn.Unflatten(1, (1, 8, 8)))
    return as_vae(_UserEncoder(extra), dec, likelihood="gaussian", decoder_output="mean")


def test_a_plain_user_encoder_certifies_and_bad_inputs_are_named():
    x = load("digits", "test").x[:4]
    model = _user_model()
    r = 1.5 * float(estimate_r_robustness(model, x, [1.0], num_samples=200).r_star.max())
    glob, loc = (certify(model, x, r, method=m, num_samples=400) for m in ("global", "local"))
    assert glob.radius.shape == (4,) and bool((glob.radius > 0).all()) and len(glob.to_rows()) == 4
    assert bool((loc.radius >= glob.radius).all())
    with pytest.raises(CertificationRefused, match=r"aten.layer_norm.default normalises .*at encoder.body.2") as info:
        certify(_user_model(nn.LayerNorm(16)), x, 2.0, num_samples=50)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    for kwargs, error, message in [
        ({"method": "exact"}, ValueError, "method"),
        ({"r": 0.0}, ValueError, "r must be"),
        ({"joint": 1}, TypeError, "joint must be a bool"),
        ({"confidence": 1.0}, ValueError, "confidence"),
    ]:
        with pytest.raises(error, match=message):
            certify(model, x, **{"r": 2.0, "num_samples": 50, **kwargs})
    conv = VAE(VAEConfig(input_shape=(1, 8, 8), architecture="conv", hidden=(16,), latent_dim=2), seed=0)
    for method in ("global", "local"):
        assert math.isfinite(float(certify(conv, x, 2.0, method=method, num_samples=50).radius.max()))
    with pytest.raises(ValueError, match="lipschitz requires architecture='mlp'"):
        VAEConfig(input_shape=(1, 8, 8), architecture="conv", lipschitz=1.0)
    with pytest.raises(ValueError, match="even"):
        VAEConfig(hidden=(15,), lipschitz=1.0)
    with pytest.raises(ValueError, match="lipschitz must be"):
        VAEConfig(lipschitz=0.0)


def test_the_certifier_is_cached_by_the_weights_digest():
    model = _user_model()
    x = load("digits", "test").x[:3]
    first = EncoderCertifier.for_model(model, x)
    assert EncoderCertifier.for_model(model, x[:1]) is first  # any batch size
    p = torch.full((3, 2), 0.9, dtype=torch.float64)
    before = first.radii(x, p, "global").radius
    assert before.shape == (3, 2) and bool((before[:, 0] == before[:, 1]).all())
    with torch.no_grad():
        model.encoder.fc_mu.weight.mul_(2)
    second = EncoderCertifier.for_model(model, x)
    assert second is not first and bool((second.radii(x, p, "global").radius < before).all())
    with pytest.raises(CertificationRefused, match="does not reproduce model.encode"):
        first.radii(x, p, "global")  # the old graph no longer matches the model's forward


def test_certify_runs_where_the_model_is(device):
    model = _user_model()
    x = load("digits", "test").x[:4]
    est = estimate_r_robustness(model, x, [2.0], num_samples=300)
    ref = [certify(model, x, 2.0, method=m, estimate=est).radius for m in ("global", "local")]
    model = model.to(device)
    est_dev = estimate_r_robustness(model, x.to(device), [2.0], num_samples=300)
    assert torch.equal(est_dev.hits, est.hits)
    for method, expected in zip(("global", "local"), ref, strict=True):
        radius = certify(model, x.to(device), 2.0, method=method, estimate=est_dev).radius
        torch.testing.assert_close(radius, expected, rtol=1e-6, atol=1e-12)


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
            assert row["cert_global"] == pytest.approx(row["cert_local"], rel=1e-9)  # a linear encoder: local = global
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


def _certify_stage(model, x, radii):
    """The sweep's certify stage on a unit of ``x`` at ``radii``, from the unit's own estimate."""
    ctx = UnitContext.build(model, x, WorkUnit("m", 0, x.shape[0]), SweepSpec(radii=radii, num_samples=100))
    return certificates(ctx, estimate(ctx))


def test_the_certify_stage_gives_the_refusal_reason(linear_vae):
    x = load("digits", "test").x[:3]
    model = _user_model()
    found = _certify_stage(model, x, [1.0, 2.0])
    assert found.global_.shape == found.local.shape == (3, 2) and found.reason is None
    seed = mc_seed(SweepSpec(radii=[1.0, 2.0], num_samples=100), "m")  # the unit's own Monte-Carlo stream
    for k, r in enumerate((1.0, 2.0)):  # each radius's column is certify's certificate from the same samples
        for method, radii in (("global", found.global_), ("local", found.local)):
            cert = vaefast.certify(model, x, r, method=method, num_samples=100, seed=seed)
            torch.testing.assert_close(radii[:, k], cert.radius, rtol=1e-6, atol=0)
    refused = _certify_stage(_user_model(nn.LayerNorm(16)), x, [2.0])
    assert refused.global_ is None and refused.local is None and "aten.layer_norm.default" in refused.reason
    exp = as_vae(_Exp(), nn.Sequential(nn.Linear(3, 64), nn.Unflatten(1, (1, 8, 8))), likelihood="gaussian",
                 decoder_output="mean")  # fmt: skip
    partly = _certify_stage(exp, x, [2.0])
    assert partly.global_ is None and partly.local is not None and partly.reason.startswith("global: certify: ")


class _Exp(nn.Module):
    """An encoder whose log-variance goes through exp (no global constant; a local one)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(18, 6)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        mu, raw = self.fc(h).chunk(2, dim=1)
        return mu, torch.log(torch.exp(raw) + 1)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    width=st.sampled_from([8, 16, 32]),
    activation=st.sampled_from(["relu", "tanh", "softplus", "elu"]),
    lipschitz=st.sampled_from([None, 2.0, {"mu": 2.0, "logvar": 2.0}, {"mu": 1.0}]),
    method=st.sampled_from(["global", "local"]),
)
def test_certificates_hold_on_random_models(seed, width, activation, lipschitz, method):
    """Property: on random small VAEs (ordinary, Lipschitz-constrained, encoder-only or mean-only Lipschitz with an
    ordinary decoder; several activations), neither the max-damage attack nor random directions at R_cert give a
    fresh estimate whose interval lies at or below 1/2.

    False-alarm rate: a sound certificate is wrong only through its own Monte-Carlo estimate (joint over the 6
    points at 1 - 1e-4) and a fresh interval refutes a true claim with probability 1e-5 (10 intervals): at most
    2e-4 per example, 8e-4 per run of 4 examples. (At the default 95% per point, a certificate of a point whose p
    is near 1/2 is wrong 1 time in 20 by design, and this test would fail for that reason alone.)"""
    cfg = VAEConfig(hidden=(width,), latent_dim=3, activation=activation, likelihood="gaussian", gaussian_std=0.2,
                    lipschitz=lipschitz)  # fmt: skip
    model = VAE(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 8, 8, generator=g) * 0.6 + 0.2
    r = 1.1 * float(estimate_r_robustness(model, x, [1.0], num_samples=300, seed=seed).r_star.median())
    est = estimate_r_robustness(model, x, [r], num_samples=1000, seed=seed + 1)
    cert = certify(model, x, r, method=method, estimate=est, confidence=1 - 1e-4, joint=True)
    ok = cert.radius > 0
    if not bool(ok.any()):
        return
    xs, radius = x[ok], cert.radius[ok]
    deltas = [MaxDamageAttack(model, 1.0, constraint="sphere", steps=20, seed=seed).attack(xs, eps=radius).delta]
    d = torch.randn(xs.shape, generator=g)
    deltas.append(torch.clamp(xs + d * (radius / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1).float(), 0, 1) - xs)
    for delta in deltas:
        fresh = estimate_r_robustness(model, xs, [r], num_samples=1000, delta=delta, seed=seed + 2,
                                      confidence=1 - 2e-5)  # fmt: skip
        assert not bool((fresh.ci_high[:, 0] <= 0.5).any()), (fresh.p_hat[:, 0], radius)
