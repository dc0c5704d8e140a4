"""vaefast.training and the train/info CLI: determinism, run folder, early stopping, IWAE bound, quality on digits."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import vaefast
from vaefast import data, training
from vaefast.cli import main
from vaefast.models import VAE, VAEConfig, as_vae, load
from vaefast.models import save as save_model
from vaefast.testing import LinearGaussianVAE
from vaefast.training import (
    encoder_statistics,
    evaluate,
    importance_weighted_log_likelihood,
    learned_nothing_warnings,
    model_baseline,
    pixel_mean_baseline,
    run_metrics,
    train,
    write_metrics,
)

torch.set_num_threads(1)


def small(**kw):
    return VAEConfig(**{"hidden": (32,), "latent_dim": 4, **kw})


def test_same_seed_same_weights(digits):
    tr, _ = digits
    x = tr.x[:200]
    states = []
    for seed in (0, 0, 1):
        m = VAE(small(objective="beta_tcvae", tc_weight=3.0), seed=0)
        train(m, x, epochs=2, batch_size=32, seed=seed, progress=False)
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_run_folder_metrics_and_checkpoints(tmp_path, digits):
    tr, te = digits
    trn, val = tr.subset(torch.arange(300)).split(0.2)
    m = VAE(small())
    hist = train(m, trn, val, epochs=3, batch_size=64, out=tmp_path / "run", progress=False)
    assert hist.epochs_run == 3 and not hist.stopped_early
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(training.METRIC_COLUMNS) == set(rows[0])
    for r, h in zip(rows, hist.rows, strict=True):
        assert float(r["val_elbo"]) == pytest.approx(h["val_elbo"])
        assert float(r["train_elbo"]) == pytest.approx(float(r["train_recon"]) - float(r["train_kl"]), abs=1e-4)
    best = max(hist.rows, key=lambda r: r["val_elbo"])
    assert hist.best_epoch == best["epoch"]
    # the returned model holds the best weights; the run folder and checkpoints/best load to the same model
    final, best_ckpt = load(tmp_path / "run"), load(tmp_path / "run" / "checkpoints" / "best")
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()
    for k, v in m.state_dict().items():
        assert torch.equal(v, final.state_dict()[k]) and torch.equal(v, best_ckpt.state_dict()[k])
    assert evaluate(final, val, seed=0)["elbo"] == pytest.approx(best["val_elbo"], rel=1e-6)


def test_early_stopping(monkeypatch, digits):
    tr, _ = digits
    scores = iter([-10.0, -11.0, -12.0, -13.0, -14.0, -15.0])

    def fake_evaluate(model, x, batch_size=512, seed=0, dataset_size=None):
        s = next(scores)
        return {"loss": -s, "elbo": s, "recon": s, "kl": 0.0, "tc": float("nan")}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    m = VAE(small())
    hist = train(m, tr.x[:64], tr.x[64:96], epochs=6, patience=2, progress=False)
    assert hist.stopped_early and hist.epochs_run == 3 and hist.best_epoch == 1


def test_train_argument_errors(digits):
    tr, _ = digits
    m = VAE(small())
    with pytest.raises(ValueError, match="train_data"):
        train(m, torch.rand(10, 1, 4, 4), progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(m, tr, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(m, tr, lr=-1.0, progress=False)
    with pytest.raises(TypeError, match="loss"):
        train(LinearGaussianVAE(), torch.rand(4, 12), progress=False)


def test_train_foreign_model():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = enc

        def forward(self, x):
            mu, lv = self.net(x).chunk(2, dim=1)
            return mu, lv

    dec = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Unflatten(1, (1, 8, 8)))
    model = as_vae(Enc(), dec, decoder_output="logits", input_shape=(1, 8, 8))
    x = data.load("digits").x[:256]
    before = float(model.elbo(x, seed=0).mean().detach())
    train(model, x, epochs=5, batch_size=32, lr=1e-2, progress=False)
    assert float(model.elbo(x, seed=0).mean().detach()) > before + 1.0


def test_conv_vae_trains_on_shapes():
    shapes = data.load("shapes", num_scales=2, num_rotations=2, num_positions=2)
    cfg = VAEConfig(input_shape=(1, 64, 64), architecture="conv", hidden=(32,), latent_dim=4, conv_channels=(4, 8))
    m = VAE(cfg)
    before = evaluate(m, shapes, seed=0)["elbo"]
    hist = train(m, shapes, epochs=3, batch_size=16, lr=3e-3, progress=False)
    assert hist.epochs_run == 3 and evaluate(m, shapes, seed=0)["elbo"] > before + 50


def test_iwae_bound_against_exact_linear_gaussian_marginal():
    # p(x) = N(c, W W^T + I) for z ~ N(0, I), x | z ~ N(W z + c, I) (W = w Q, Q orthonormal columns)
    model = LinearGaussianVAE(input_dim=6, latent_dim=2, sigma=0.6, decoder_scale=1.5, seed=2)
    w, c = model.decoder_linear.weight.detach().numpy(), model.decoder_linear.bias.detach().numpy()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 6))) + torch.from_numpy(c)
    exact = stats.multivariate_normal(c, w @ w.T + np.eye(6)).logpdf(x.numpy())
    # a poor proposal q (random linear encoder): K = 1 is the ELBO, below log p(x) on average; K large gets close
    k1 = torch.stack([importance_weighted_log_likelihood(model, x, 1, seed=s) for s in range(200)]).mean(0)
    assert bool((k1.numpy() < exact - 0.1).all())
    k_big = importance_weighted_log_likelihood(model, x, num_samples=20000, seed=0)
    np.testing.assert_allclose(k_big.numpy(), exact, atol=0.3)
    assert bool((k_big.numpy() > k1.numpy()).all())
    assert torch.equal(k_big, importance_weighted_log_likelihood(model, x, num_samples=20000, seed=0))
    # the exact posterior N(S W^T (x - c), S), S = I / (1 + w^2), as proposal: every weight equals p(x)
    s2 = 1.0 / (1.0 + 1.5**2)
    with torch.no_grad():
        model.encoder_mean.weight.copy_(torch.from_numpy(s2 * w.T))
        model.encoder_mean.bias.copy_(torch.from_numpy(-s2 * w.T @ c))
    model.sigma = math.sqrt(s2)
    for k in (1, 7):
        np.testing.assert_allclose(importance_weighted_log_likelihood(model, x, k, seed=3).numpy(), exact, rtol=1e-10)


def test_pixel_mean_baseline_is_the_independent_bernoulli_log_likelihood():
    a = torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]]).unsqueeze(1)  # [2, 1, 1, 2]
    b = torch.tensor([[[0.25, 0.5]]]).unsqueeze(1)
    p = np.clip(np.array([0.5, 1.0]), 1e-4, 1 - 1e-4)
    ref = 0.25 * math.log(p[0]) + 0.75 * math.log(1 - p[0]) + 0.5 * math.log(p[1]) + 0.5 * math.log(1 - p[1])
    assert float(pixel_mean_baseline(a, b)[0]) == pytest.approx(ref)


def test_pixel_mean_baseline_gaussian_is_the_fixed_std_normal_log_likelihood():
    a = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    b = torch.tensor([[0.25, 0.5]]).reshape(1, 1, 1, 2)
    ref = stats.norm(loc=[0.5, 1.0], scale=0.2).logpdf([0.25, 0.5]).sum()
    assert float(pixel_mean_baseline(a, b, "gaussian", gaussian_std=0.2)[0]) == pytest.approx(ref)
    with pytest.raises(ValueError, match="gaussian_std"):
        pixel_mean_baseline(a, b, "gaussian", gaussian_std=0.0)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        pixel_mean_baseline(a, b, "gaussian_learned")


def test_pixel_mean_baseline_continuous_bernoulli_is_the_maximum_likelihood_constant():
    from torch.distributions import ContinuousBernoulli

    x = torch.rand(500, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
    best = float(pixel_mean_baseline(x, x, "continuous_bernoulli").sum())
    logits = training._continuous_bernoulli_logits(x.mean(0))
    assert torch.allclose(ContinuousBernoulli(logits=logits).mean, x.mean(0), atol=1e-9)
    for shift in (-0.05, 0.05):  # the mean-matching logits maximise the training log-likelihood
        other = ContinuousBernoulli(logits=(logits + shift).expand_as(x)).log_prob(x).sum()
        assert best > float(other)


def test_model_baseline_follows_the_likelihood(digits):
    tr, te = digits
    gauss = VAE(small(likelihood="gaussian", gaussian_std=0.3))
    expected = pixel_mean_baseline(tr, te, "gaussian", gaussian_std=0.3)
    assert torch.equal(model_baseline(gauss, tr, te), expected)
    assert torch.equal(model_baseline(VAE(small()), tr, te), pixel_mean_baseline(tr, te))
    assert model_baseline(VAE(small(likelihood="gaussian_learned")), tr, te) is None


class _ZeroEncoder(torch.nn.Module):
    """An encoder that ignores its input: q(z|x) = N(0, I), the prior (KL exactly 0)."""

    def forward(self, x):
        zeros = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        return zeros, zeros


def test_learned_nothing_warnings_on_an_encoder_that_ignores_its_input(digits):
    tr, te = digits
    decoder = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Unflatten(1, (1, 8, 8)))
    torch.nn.init.zeros_(decoder[0].weight), torch.nn.init.zeros_(decoder[0].bias)  # p = 1/2 everywhere
    model = as_vae(_ZeroEncoder(), decoder, decoder_output="logits", input_shape=(1, 8, 8))
    kl, sigma = encoder_statistics(model, te)
    assert kl.shape == (2,) and float(kl.abs().max()) == 0.0 and sigma == pytest.approx(1.0)
    warnings = learned_nothing_warnings(model, te, tr)
    assert len(warnings) == 2
    assert warnings[0].startswith("posterior collapse: the mean test KL is below 0.01 nats in all 2 latent")
    assert "test ELBO -44.361 is not better than the trivial per-pixel-mean bernoulli baseline -27.199" in warnings[1]
    assert learned_nothing_warnings(model, te) == warnings[:1]  # no train data: no baseline check
    with pytest.raises(ValueError, match="kl_threshold"):
        learned_nothing_warnings(model, te, kl_threshold=0.0)


@pytest.mark.slow
def test_learned_nothing_warnings_after_training(digits):
    tr, te = digits
    collapsed = VAE(VAEConfig(hidden=(64,), latent_dim=4, objective="beta_vae", beta=50.0), seed=0)
    train(collapsed, tr, epochs=2, batch_size=64, lr=2e-3, progress=False)
    warnings = learned_nothing_warnings(collapsed, te, tr)
    assert len(warnings) == 2 and warnings[0].startswith("posterior collapse"), warnings
    assert "not better than the trivial per-pixel-mean bernoulli baseline" in warnings[1]
    informative = VAE(VAEConfig(hidden=(64,), latent_dim=4, likelihood="gaussian", gaussian_std=0.2), seed=0)
    train(informative, tr, epochs=10, batch_size=64, lr=2e-3, progress=False)
    assert learned_nothing_warnings(informative, te, tr) == []


def test_run_metrics_and_write_metrics(tmp_path, digits):
    tr, te = digits
    trn, val = tr.split(0.1)
    model = VAE(small(objective="beta_tcvae", tc_weight=2.0), seed=0)
    history = train(model, trn, val, epochs=1, batch_size=64, progress=False)
    metrics = run_metrics(model, history, trn, val, te, iw_samples=3, seed=0)
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (len(trn), len(val), len(te))
    assert metrics["epochs_run"] == 1 and metrics["iw_samples"] == 3 and metrics["test_tc"] is not None
    assert metrics["test_elbo"] == pytest.approx(evaluate(model, te, seed=0, dataset_size=len(trn))["elbo"])
    assert len(metrics["test_kl_per_dim"]) == 4
    assert metrics["test_pixel_mean_baseline"] == pytest.approx(float(pixel_mean_baseline(trn, te).mean()))
    assert isinstance(metrics["warnings"], list)
    path = write_metrics(tmp_path / "run", metrics)
    assert json.loads(path.read_text()) == metrics
    plain = run_metrics(VAE(small()), history, trn, None, te, iw_samples=2)
    assert plain["n_val"] == 0 and plain["test_tc"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    m = VAE(small())
    with pytest.raises(ValueError, match=r"device cuda: no CUDA GPU is visible"):
        train(m, torch.rand(8, 1, 8, 8), device="cuda", progress=False)
    save_model(m, tmp_path / "run")
    with pytest.raises(ValueError, match=r"map_location cuda: no CUDA GPU is visible"):
        load(tmp_path / "run", map_location="cuda")


# --- quality on real data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(digits):
    tr, _ = digits
    models = {}
    for beta in (1.0, 8.0):
        m = VAE(VAEConfig(hidden=(128, 128), latent_dim=8, objective="beta_vae", beta=beta), seed=0)
        train(m, tr, epochs=20, batch_size=64, lr=2e-3, seed=0, progress=False)
        models[beta] = m
    return models


@pytest.mark.slow
def test_trained_vae_beats_trivial_baseline(trained, digits):
    tr, te = digits
    m = trained[1.0]
    baseline = float(pixel_mean_baseline(tr, te).mean())  # -27.20 nats on the test split
    elbo = evaluate(m, te, seed=0)["elbo"]  # -25.42 here after 20 epochs (IWAE K=50: -25.14)
    iw = float(importance_weighted_log_likelihood(m, te, num_samples=50, seed=0).mean())
    assert elbo > baseline + 1.0, (elbo, baseline)
    assert iw >= elbo - 0.05


@pytest.mark.slow
def test_larger_beta_gives_larger_encoder_sigma(trained, digits):
    _, te = digits
    with torch.no_grad():
        sig = {b: float(torch.exp(0.5 * m.encode(te.x)[1]).mean()) for b, m in trained.items()}
    assert sig[8.0] > sig[1.0] + 0.1, sig


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_train_and_info(tmp_path, capsys):
    out = tmp_path / "beta4"
    argv = ["train", "--data", "digits", "--latent", "3", "--hidden", "16", "--beta", "4", "--epochs", "2"]
    assert main([*argv, "--out", str(out), "--no-progress", "--iw-samples", "5", "--patience", "5"]) == 0
    printed = capsys.readouterr().out
    assert "test ELBO" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    model = vaefast.load_model(out)
    assert model.config.objective == "beta_vae" and model.config.beta == 4.0 and model.latent_dim == 3
    assert metrics["epochs_run"] == 2 and metrics["n_train"] + metrics["n_val"] == 1437
    assert math.isfinite(metrics["test_elbo"]) and math.isfinite(metrics["test_iw_log_likelihood"])
    assert isinstance(metrics["warnings"], list) and len(metrics["test_kl_per_dim"]) == 3
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "objective: beta_vae" in shown and "test_elbo" in shown
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["beta"] == 4.0


def test_cli_tcvae_and_errors(tmp_path, capsys):
    out = tmp_path / "tc"
    argv = ["train", "--objective", "beta_tcvae", "--tc-weight", "6", "--hidden", "16", "--latent", "2"]
    assert main([*argv, "--epochs", "1", "--out", str(out), "--no-progress", "--iw-samples", "2"]) == 0
    m = load(out)
    assert m.config.tc_weight == 6.0 and m.config.objective == "beta_tcvae"
    assert json.loads((out / "metrics.json").read_text())["test_tc"] is not None
    capsys.readouterr()
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["train", "--latent", "0", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2


def test_each_purpose_has_its_own_derived_seed(digits):
    """evaluate's noise comes from derive_seed(seed, "training", "evaluate"): not the ELBO's, not the raw seed's."""
    from vaefast.rng import derive_seed

    model = VAE(small()).eval()
    x = digits[1].x[:50]
    gen = torch.Generator().manual_seed(derive_seed(3, "training", "evaluate"))
    with torch.no_grad():
        want = float(model.loss(x, dataset_size=50, generator=gen).elbo)
    assert evaluate(model, x, batch_size=64, seed=3)["elbo"] == pytest.approx(want, rel=1e-6)
    with torch.no_grad():
        raw = float(model.loss(x, dataset_size=50, generator=torch.Generator().manual_seed(3)).elbo)
    assert raw != want
