"""Training loop for protocol models that define ``loss`` (vaefast ``VAE`` and ``as_vae`` adapters), plus
evaluation helpers: the batched ELBO, the importance-weighted log-likelihood bound, trivial latent-free baselines,
a learned-nothing check (posterior collapse) and the metrics of a finished run (``metrics.json``).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributions import ContinuousBernoulli
from tqdm.auto import tqdm

from vaefast._checks import check_device, check_positive_float, check_positive_int, check_seed, check_tensor
from vaefast.data.base import DataSplit

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_elbo",
    "train_recon",
    "train_kl",
    "train_tc",
    "val_loss",
    "val_elbo",
    "val_recon",
    "val_kl",
    "val_tc",
    "seconds",
)


@dataclass
class TrainingHistory:
    """Per-epoch metrics (``rows``: dicts keyed by ``METRIC_COLUMNS``; NaN where not applicable) and the outcome.

    ``best_epoch`` maximises the validation ELBO (the training ELBO without validation data); the returned
    model holds that epoch's weights when ``restore_best`` (the default).
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_elbo: float = float("-inf")
    stopped_early: bool = False
    seconds: float = 0.0
    out: Path | None = None

    def column(self, name: str) -> list[float]:
        """One metric over epochs."""
        if name not in METRIC_COLUMNS:
            raise ValueError(f"name must be one of {list(METRIC_COLUMNS)}, got {name!r}")
        return [row[name] for row in self.rows]

    @property
    def epochs_run(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_elbo": self.best_elbo,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "rows": self.rows,
        }


def as_images(data: DataSplit | torch.Tensor, name: str, model: nn.Module | None = None) -> torch.Tensor:
    """The image tensor of a ``DataSplit`` or tensor, checked against ``model.input_shape``."""
    x = data.x if isinstance(data, DataSplit) else data
    x = check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, *input_shape], got {tuple(x.shape)}")
    if model is not None and tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"{name} has points of shape {tuple(x.shape[1:])} but the model expects {model.input_shape}")
    return x


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    for start in range(0, n, batch_size):
        yield slice(start, start + batch_size) if order is None else order[start : start + batch_size]


def _terms_to_floats(terms: Any) -> dict[str, float]:
    out = {}
    for key in ("loss", "elbo", "recon", "kl", "tc"):
        value = getattr(terms, key)
        out[key] = float("nan") if value is None else float(value.detach())
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataSplit | torch.Tensor,
    batch_size: int = 512,
    seed: int = 0,
    dataset_size: int | None = None,
) -> dict[str, float]:
    """Means over ``data`` of the objective's terms (``loss``, ``elbo``, ``recon``, ``kl``, ``tc``): one latent
    sample per point from a generator seeded with ``seed`` (same seed, same numbers)."""
    check_positive_int("batch_size", batch_size)
    check_seed("seed", seed)
    x = as_images(data, "data", model)
    device = _device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    n = x.shape[0]
    size = max(dataset_size or n, min(batch_size, n))
    sums = dict.fromkeys(("loss", "elbo", "recon", "kl", "tc"), 0.0)
    for idx in _batches(n, batch_size):
        xb = x[idx].to(device)
        terms = _terms_to_floats(model.loss(xb, dataset_size=size, generator=gen))
        for key in sums:
            sums[key] += terms[key] * xb.shape[0]
    model.train(was_training)
    return {key: value / n for key, value in sums.items()}


def train(
    model: nn.Module,
    train_data: DataSplit | torch.Tensor,
    val_data: DataSplit | torch.Tensor | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    patience: int | None = None,
    progress: bool = True,
    restore_best: bool = True,
    num_threads: int | str | None = "auto",
) -> TrainingHistory:
    """Train ``model`` with Adam on its own objective (``model.loss``), one epoch = one shuffled pass.

    Per epoch, the train means (accumulated during the epoch) and validation means (:func:`evaluate`, fixed
    seed) of loss / ELBO / recon / KL / TC go to ``out/metrics.csv``; ``out/checkpoints/{last,best}`` hold the
    weights; early stopping after ``patience`` epochs without a better validation ELBO. Finally the best weights
    are restored (``restore_best``) and saved to ``out`` (``config.json`` + ``model.safetensors``).
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device`` (a CUDA request without a
    visible GPU is a ``ValueError``).
    ``num_threads``: torch intra-op threads while training (restored afterwards); ``"auto"`` uses 1 for
    conv-free models on CPU (several times faster for these small GEMMs on a busy machine).
    Shuffling and the reparameterisation noise come from generators seeded with ``seed``: on CPU, the same
    model initialisation and seed give bit-identical weights.
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
        raise TypeError("model must be an nn.Module with a loss(x, dataset_size, generator) method (a vaefast VAE)")
    x_train = as_images(train_data, "train_data", model)
    x_val = None if val_data is None else as_images(val_data, "val_data", model)
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_float("lr", lr)
    check_seed("seed", seed)
    if patience is not None:
        check_positive_int("patience", patience)
    device = check_device("device", device)
    out_dir = None if out is None else Path(out)
    model.to(device)
    threads = _training_threads(model, device, num_threads)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_loop(
            model, x_train, x_val, epochs, batch_size, lr, seed, device, out_dir, patience, progress, restore_best
        )
    finally:
        torch.set_num_threads(previous_threads)


def _training_threads(model: nn.Module, device: torch.device, num_threads: int | str | None) -> int | None:
    """``"auto"``: one intra-op thread for conv-free models on CPU (their small GEMMs gain nothing from more
    threads and slow down badly on a shared machine), else torch's setting; an int is used as given."""
    if num_threads is None:
        return None
    if num_threads == "auto":
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        return 1 if device.type == "cpu" and not has_conv else None
    return check_positive_int("num_threads", num_threads)


def _train_loop(
    model: nn.Module,
    x_train: torch.Tensor,
    x_val: torch.Tensor | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    out_dir: Path | None,
    patience: int | None,
    progress: bool,
    restore_best: bool,
) -> TrainingHistory:
    from vaefast.models.io import save

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed((seed + 1) % 2**63)
    n = x_train.shape[0]
    history = TrainingHistory(out=out_dir)
    best_state: dict[str, torch.Tensor] | None = None
    writer = None
    csv_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_file = open(out_dir / "metrics.csv", "w", newline="")  # noqa: SIM115  (closed in finally)
        writer = csv.DictWriter(csv_file, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
    start = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            sums = dict.fromkeys(("loss", "elbo", "recon", "kl", "tc"), 0.0)
            order = torch.randperm(n, generator=shuffle_gen)
            for idx in _batches(n, batch_size, order):
                xb = x_train[idx].to(device, non_blocking=True)
                terms = model.loss(xb, dataset_size=n, generator=noise_gen)
                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                optimizer.step()
                for key, value in _terms_to_floats(terms).items():
                    sums[key] += value * xb.shape[0]
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {sums['loss']}); try a lower lr")
            row = {f"train_{k}": v / n for k, v in sums.items()}
            val = evaluate(model, x_val, batch_size=max(batch_size, 256), seed=seed) if x_val is not None else None
            row.update({f"val_{k}": (float("nan") if val is None else val[k]) for k in sums})
            row["epoch"], row["seconds"] = epoch, time.perf_counter() - t0
            history.rows.append({k: row[k] for k in METRIC_COLUMNS})
            score = row["val_elbo"] if val is not None else row["train_elbo"]
            improved = score > history.best_elbo
            if improved:
                history.best_epoch, history.best_elbo = epoch, score
                best_state = copy.deepcopy(model.state_dict())
            if writer is not None:
                writer.writerow(history.rows[-1])
                csv_file.flush()
                save(model, out_dir / "checkpoints" / "last")
                if improved:
                    save(model, out_dir / "checkpoints" / "best")
            bar.set_postfix(train_elbo=f"{row['train_elbo']:.2f}", val_elbo=f"{row['val_elbo']:.2f}")
            if patience is not None and epoch - history.best_epoch >= patience:
                history.stopped_early = True
                break
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.seconds = time.perf_counter() - start
    if out_dir is not None:
        save(model, out_dir)
    return history


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: nn.Module,
    x: DataSplit | torch.Tensor,
    num_samples: int = 100,
    seed: int = 0,
    max_batch_elements: int = 65536,
) -> torch.Tensor:
    """Per-point IWAE bound ``log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)``, ``z_k ~ q(z|x)`` (Burda et al. 2016).

    A lower bound on ``log p(x)`` that tightens as K grows (K = 1: the single-sample ELBO with a sampled KL).
    Points are processed in chunks of ``max_batch_elements // K``; noise comes from one generator seeded with
    ``seed``.
    """
    check_positive_int("num_samples", num_samples)
    check_seed("seed", seed)
    check_positive_int("max_batch_elements", max_batch_elements)
    xs = as_images(x, "x", model)
    device = _device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, max_batch_elements // num_samples)
    out = []
    was_training = model.training
    model.eval()
    for idx in _batches(xs.shape[0], chunk):
        xb = xs[idx].to(device)
        mu, logvar = model.encode(xb)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((xb.shape[0], num_samples, mu.shape[1]), generator=gen, device=device, dtype=mu.dtype)
        z = mu.unsqueeze(1) + std.unsqueeze(1) * eps
        b, k = z.shape[:2]
        x_rep = xb.unsqueeze(1).expand(b, k, *xb.shape[1:]).reshape(b * k, *xb.shape[1:])
        log_px_z = model.log_likelihood(x_rep, z.reshape(b * k, -1)).reshape(b, k)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + logvar.unsqueeze(1) + math.log(2 * math.pi)).sum(-1)
        out.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=1) - math.log(num_samples))
    model.train(was_training)
    return torch.cat(out)


BASELINE_LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")
KL_THRESHOLD = 0.01  # nats per latent dimension: below it in every dimension, the encoder carries no information


def pixel_mean_baseline(
    train_x: DataSplit | torch.Tensor,
    x: DataSplit | torch.Tensor,
    likelihood: str = "bernoulli",
    gaussian_std: float = 0.1,
) -> torch.Tensor:
    """Exact per-point log-likelihood of the trivial model that ignores its latent: every pixel independent, with
    the per-pixel mean of ``train_x`` as the likelihood's mean. It is the best such model (the maximum-likelihood
    constant decoder on ``train_x``), so a VAE whose ELBO does not beat it has learned nothing.

    Args:
        train_x: the data the per-pixel means come from ``[N, *shape]``.
        x: the points to score ``[M, *shape]``.
        likelihood: ``"bernoulli"`` (``p_j`` = mean of pixel j, clamped to [1e-4, 1 - 1e-4]; grey levels allowed),
            ``"gaussian"`` (``N(x; m, gaussian_std^2 I)``) or ``"continuous_bernoulli"`` (the constant logits whose
            continuous-Bernoulli mean is the pixel mean, the maximum-likelihood choice for this exponential family;
            logits limited to [-15, 15], where torch's float32 density is normalised).
        gaussian_std: the fixed standard deviation of the ``"gaussian"`` likelihood.

    Returns:
        ``[M]`` log-likelihoods in nats (float64).
    """
    a = as_images(train_x, "train_x").double()
    b = as_images(x, "x").double()
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"train_x and x must have the same point shape, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}"
        )
    mean = a.mean(0)
    if likelihood == "bernoulli":
        p = mean.clamp(1e-4, 1 - 1e-4)
        return (b * p.log() + (1 - b) * (1 - p).log()).flatten(1).sum(1)
    if likelihood == "gaussian":
        std = check_positive_float("gaussian_std", gaussian_std)
        return (-0.5 * ((b - mean) / std).pow(2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    if likelihood == "continuous_bernoulli":
        logits = _continuous_bernoulli_logits(mean)
        return ContinuousBernoulli(logits=logits.expand_as(b), validate_args=False).log_prob(b).flatten(1).sum(1)
    raise ValueError(f"likelihood must be one of {list(BASELINE_LIKELIHOODS)}, got {likelihood!r}")


def _continuous_bernoulli_logits(mean: torch.Tensor, limit: float = 15.0, steps: int = 60) -> torch.Tensor:
    """Logits in ``[-limit, limit]`` whose continuous-Bernoulli mean is ``mean`` (bisection; the mean is increasing
    in the logits), clipped to the range's end where ``mean`` lies beyond it."""
    lo, hi = torch.full_like(mean, -limit), torch.full_like(mean, limit)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        below = ContinuousBernoulli(logits=mid, validate_args=False).mean < mean
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def model_baseline(
    model: nn.Module, train_x: DataSplit | torch.Tensor, x: DataSplit | torch.Tensor
) -> torch.Tensor | None:
    """:func:`pixel_mean_baseline` under ``model``'s own likelihood (and Gaussian std).

    Args:
        model: a protocol model with ``likelihood`` (name) and, for ``"gaussian"``, ``observation.std``.
        train_x: the training data (per-pixel means).
        x: the points to score.

    Returns:
        ``[M]`` log-likelihoods, or None for likelihoods without a fixed-form baseline: ``gaussian_learned`` (the
        trivial model would learn its variance too, and on constant pixels its likelihood grows without bound up
        to the variance clamp, so the comparison says nothing) and unknown likelihoods.
    """
    name = getattr(model, "likelihood", None)
    if name not in BASELINE_LIKELIHOODS:
        return None
    std = getattr(getattr(model, "observation", None), "std", 0.1)
    return pixel_mean_baseline(train_x, x, likelihood=name, gaussian_std=std)


@torch.no_grad()
def encoder_statistics(
    model: nn.Module, data: DataSplit | torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, float]:
    """The mean KL per latent dimension and the mean encoder standard deviation over ``data``.

    Args:
        model: a protocol model (``encode(x) -> (mu, logvar)``).
        data: the points ``[N, *input_shape]``.
        batch_size: points per encoder call.

    Returns:
        ``(kl_per_dim [d] in nats, mean sigma)``, with the analytic ``KL(q(z_k|x) || N(0, 1))`` averaged over points.
    """
    check_positive_int("batch_size", batch_size)
    x = as_images(data, "data", model)
    device = _device(model)
    was_training = model.training
    model.eval()
    kl_sum, sigma_sum = None, 0.0
    for idx in _batches(x.shape[0], batch_size):
        mu, logvar = model.encode(x[idx].to(device))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)
        kl_sum = kl.sum(0) if kl_sum is None else kl_sum + kl.sum(0)
        sigma_sum += float(torch.exp(0.5 * logvar).sum())
    model.train(was_training)
    return (kl_sum / x.shape[0]).double().cpu(), sigma_sum / (x.shape[0] * kl_sum.numel())


def learned_nothing_warnings(
    model: nn.Module,
    test_data: DataSplit | torch.Tensor,
    train_data: DataSplit | torch.Tensor | None = None,
    *,
    test_elbo: float | None = None,
    kl_threshold: float = KL_THRESHOLD,
    seed: int = 0,
) -> list[str]:
    """Warnings when a trained model has learned nothing about its data (empty list when it has).

    Two checks: (1) posterior collapse, the mean KL on ``test_data`` below ``kl_threshold`` nats (default 0.01)
    in every latent dimension, so the encoder passes no information to the decoder; (2) with ``train_data``, a
    test ELBO not better than (``<=``) the trivial per-pixel-mean baseline of :func:`model_baseline` under the
    model's own likelihood (skipped where it has none, e.g. ``gaussian_learned``).

    Args:
        model: the trained protocol model.
        test_data: held-out points.
        train_data: the training points (for the baseline's per-pixel means); None skips check (2).
        test_elbo: the mean test ELBO if already known (else :func:`evaluate` with ``seed``).
        kl_threshold: nats per latent dimension below which a dimension counts as unused.
        seed: seed of the ELBO's latent samples.

    Returns:
        One message per failed check.
    """
    kl_threshold = check_positive_float("kl_threshold", kl_threshold)
    warnings: list[str] = []
    kl_per_dim, _ = encoder_statistics(model, test_data)
    largest = float(kl_per_dim.max())
    if largest < kl_threshold:
        warnings.append(
            f"posterior collapse: the mean test KL is below {kl_threshold:g} nats in all {kl_per_dim.numel()} latent "
            f"dimensions (largest {largest:.2g}), so the encoder ignores its input and the model learned nothing; "
            "try a smaller beta or a Gaussian likelihood"
        )
    baseline = None if train_data is None else model_baseline(model, train_data, test_data)
    if baseline is not None:
        elbo = evaluate(model, test_data, seed=seed)["elbo"] if test_elbo is None else float(test_elbo)
        base = float(baseline.mean())
        if not elbo > base:
            warnings.append(
                f"test ELBO {elbo:.3f} is not better than the trivial per-pixel-mean {model.likelihood} baseline "
                f"{base:.3f} (a model that ignores its latent): the model learned nothing"
            )
    return warnings


def run_metrics(
    model: nn.Module,
    history: TrainingHistory,
    train_data: DataSplit | torch.Tensor,
    val_data: DataSplit | torch.Tensor | None,
    test_data: DataSplit | torch.Tensor,
    *,
    iw_samples: int = 100,
    seed: int = 0,
    kl_threshold: float = KL_THRESHOLD,
) -> dict[str, Any]:
    """The final metrics of a training run (what ``vaefast train`` writes to ``metrics.json``).

    Args:
        model: the trained model (as :func:`train` returns it: best weights, eval mode).
        history: :func:`train`'s history.
        train_data: the points it was trained on (``dataset_size`` of β-TCVAE; the baseline's pixel means).
        val_data: the validation points (None: none).
        test_data: held-out points every test metric is measured on.
        iw_samples: K of the importance-weighted log-likelihood bound.
        seed: seed of the Monte-Carlo estimates.
        kl_threshold: see :func:`learned_nothing_warnings`.

    Returns:
        A JSON-ready dict: sizes, the history's outcome, ``test_elbo`` / ``test_recon`` / ``test_kl`` / ``test_tc``
        (None unless β-TCVAE), ``test_iw_log_likelihood``, ``test_mean_encoder_sigma``, ``test_kl_per_dim``,
        ``test_pixel_mean_baseline`` (None where :func:`model_baseline` has none) and ``warnings`` (a list of
        strings, empty when the model learned something).
    """
    n_train = as_images(train_data, "train_data", model).shape[0]
    test = evaluate(model, test_data, seed=seed, dataset_size=n_train)
    iw = importance_weighted_log_likelihood(model, test_data, num_samples=iw_samples, seed=seed)
    kl_per_dim, sigma = encoder_statistics(model, test_data)
    baseline = model_baseline(model, train_data, test_data)
    return {
        "n_train": n_train,
        "n_val": 0 if val_data is None else as_images(val_data, "val_data", model).shape[0],
        "n_test": as_images(test_data, "test_data", model).shape[0],
        "epochs_run": history.epochs_run,
        "best_epoch": history.best_epoch,
        "best_val_elbo": history.best_elbo,
        "stopped_early": history.stopped_early,
        "train_seconds": history.seconds,
        "test_elbo": test["elbo"],
        "test_recon": test["recon"],
        "test_kl": test["kl"],
        "test_tc": None if math.isnan(test["tc"]) else test["tc"],
        "test_iw_log_likelihood": float(iw.mean()),
        "iw_samples": iw_samples,
        "test_mean_encoder_sigma": sigma,
        "test_kl_per_dim": [float(v) for v in kl_per_dim],
        "test_pixel_mean_baseline": None if baseline is None else float(baseline.mean()),
        "warnings": learned_nothing_warnings(
            model, test_data, train_data, test_elbo=test["elbo"], kl_threshold=kl_threshold, seed=seed
        ),
    }


def write_metrics(out: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` to ``out/metrics.json`` (indented JSON; the folder is created if needed).

    Args:
        out: the run folder.
        metrics: a JSON-serialisable dict (e.g. from :func:`run_metrics`).

    Returns:
        The path written.
    """
    path = Path(out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path
