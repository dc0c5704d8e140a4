"""Training loop for protocol models that define ``loss`` (vaefast ``VAE`` and ``as_vae`` adapters), plus
evaluation helpers: the batched ELBO, the importance-weighted log-likelihood bound, trivial latent-free baselines,
a learned-nothing check (posterior collapse) and the metrics of a finished run (``metrics.json``).

Random numbers: every purpose has its own generator, seeded with ``rng.derive_seed(seed, "training", purpose)``
for the purposes ``"shuffle"`` (the epoch order), ``"noise"`` (the training objective's reparameterisation),
``"evaluate"`` (:func:`evaluate`, also the validation of :func:`train`) and ``"iwae"``
(:func:`importance_weighted_log_likelihood`), so no two purposes (nor ``VAE``'s own initialisation) share numbers.
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

from vaefast import rng
from vaefast._checks import (
    check_device,
    check_inputs,
    check_positive_float,
    check_positive_int,
    check_seed,
    check_tensor,
    eval_mode,
    model_device_dtype,
)
from vaefast._chunks import index_batches, points_per_batch
from vaefast._progress import progress_bar
from vaefast._threads import resolve_threads
from vaefast.data.base import DataSplit
from vaefast.models.likelihoods import gaussian_kl, gaussian_log_density, repeat_per_sample
from vaefast.models.lipschitz import retract_
from vaefast.models.vae import sample_latent

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


TERMS = ("loss", "elbo", "recon", "kl", "tc")


@dataclass
class TrainingHistory:
    """Per-epoch metrics and the outcome of :func:`train`.

    Attributes:
        rows: one dict per epoch keyed by ``METRIC_COLUMNS`` (NaN where not applicable).
        best_epoch: the epoch with the largest validation ELBO (the training ELBO without validation data); the
            returned model holds its weights when ``restore_best`` (the default).
        best_elbo: that ELBO.
        stopped_early: whether ``patience`` ended the run.
        seconds: the wall time of the run.
        out: the run folder, if any.
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_elbo: float = float("-inf")
    stopped_early: bool = False
    seconds: float = 0.0
    out: Path | None = None

    def column(self, name: str) -> list[float]:
        """One metric over epochs.

        Args:
            name: one of ``METRIC_COLUMNS``.

        Returns:
            Its value per epoch.
        """
        if name not in METRIC_COLUMNS:
            raise ValueError(f"name must be one of {list(METRIC_COLUMNS)}, got {name!r}")
        return [row[name] for row in self.rows]

    @property
    def epochs_run(self) -> int:
        """The number of epochs trained.

        Returns:
            ``len(rows)``.
        """
        return len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The history as JSON-ready values.

        Returns:
            ``best_epoch, best_elbo, epochs_run, stopped_early, seconds, rows``.
        """
        return {
            "best_epoch": self.best_epoch,
            "best_elbo": self.best_elbo,
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "rows": self.rows,
        }


def as_images(data: DataSplit | torch.Tensor, name: str, model: nn.Module | None = None) -> torch.Tensor:
    """The point tensor of a ``DataSplit`` or tensor.

    Args:
        data: a :class:`DataSplit` (its ``x``) or a tensor ``[N, *shape]``.
        name: the argument's name in error messages.
        model: checked against its input shape (:func:`vaefast._checks.check_inputs`) when given.

    Returns:
        The finite float tensor ``[N, *shape]``.
    """
    x = data.x if isinstance(data, DataSplit) else data
    if model is not None:
        return check_inputs(model, x, name)
    x = check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, *input_shape], got {tuple(x.shape)}")
    return x


def _device(model: nn.Module, x: torch.Tensor) -> torch.device:
    """The model's device (``x``'s for a parameterless model)."""
    return model_device_dtype(model, x)[0]


def _generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``derive_seed(seed, "training", purpose)``."""
    return rng.generator(seed, "training", purpose, device=device)


def _terms_to_floats(terms: Any) -> dict[str, float]:
    """The :data:`TERMS` of a ``LossTerms`` as floats (NaN for absent ones)."""
    return dict(zip(TERMS, _terms_vector(terms).tolist(), strict=True))


def _terms_vector(terms: Any) -> torch.Tensor:
    """The :data:`TERMS` of a ``LossTerms`` as one float64 vector on their device (NaN for absent ones): summed over
    batches there and read once per epoch, not once per step (each read is a host synchronisation on a GPU)."""
    loss = terms.loss.detach()
    nan = torch.full((), math.nan, dtype=torch.float64, device=loss.device)
    values = [nan if getattr(terms, k) is None else getattr(terms, k).detach().to(torch.float64) for k in TERMS]
    return torch.stack(values)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DataSplit | torch.Tensor,
    batch_size: int = 512,
    seed: int = 0,
    dataset_size: int | None = None,
) -> dict[str, float]:
    """Means over ``data`` of the objective's terms, from one latent sample per point, in eval mode.

    Args:
        model: a protocol model with ``loss`` (the caller's modes are restored).
        data: the points.
        batch_size: points per ``loss`` call.
        seed: the noise comes from a generator seeded with ``derive_seed(seed, "training", "evaluate")`` (same seed,
            same numbers).
        dataset_size: ``N`` of β-TCVAE's minibatch-weighted sampling (default ``len(data)``).

    Returns:
        ``{"loss", "elbo", "recon", "kl", "tc"}``: point-weighted means of the batch means (``tc`` NaN unless
        β-TCVAE).
    """
    check_positive_int("batch_size", batch_size)
    x = as_images(data, "data", model)
    device = _device(model, x)
    gen = _generator(seed, "evaluate", device)
    n = x.shape[0]
    size = max(dataset_size or n, min(batch_size, n))
    sums = dict.fromkeys(TERMS, 0.0)
    with eval_mode(model):
        for idx in index_batches(n, batch_size):
            xb = x[idx].to(device)
            terms = _terms_to_floats(model.loss(xb, dataset_size=size, generator=gen))
            for key in sums:
                sums[key] += terms[key] * xb.shape[0]
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
    progress: bool = False,
    restore_best: bool = True,
    num_threads: int | str | None = "auto",
) -> TrainingHistory:
    """Train ``model`` with Adam on its own objective (``model.loss``), one epoch = one shuffled pass; after every step
    the orthonormal layers of a Lipschitz-constrained model are retracted (:func:`vaefast.models.lipschitz.retract_`).

    Per epoch, the train means (accumulated during the epoch) and validation means (:func:`evaluate`, fixed seed) of
    loss / ELBO / recon / KL / TC go to ``out/metrics.csv``; ``out/checkpoints/{last,best}`` hold the weights.

    Args:
        model: an ``nn.Module`` with ``loss(x, dataset_size, generator)`` (a vaefast ``VAE`` or ``as_vae`` model).
        train_data: the training points.
        val_data: validation points (None: the best epoch is chosen on the training ELBO).
        epochs: the most epochs.
        batch_size: points per step.
        lr: Adam's learning rate.
        seed: the shuffling, the reparameterisation noise and the validation noise come from generators seeded
            from it (one per purpose); on CPU, the same model initialisation and seed give bit-identical weights.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device`` (a CUDA request without a
            visible GPU is a ``ValueError``).
        out: the run folder (None: nothing written); the final weights go to ``out`` (``config.json`` +
            ``model.safetensors``).
        patience: stop after this many epochs without a better validation ELBO (None: never).
        progress: progress over epochs (a bar on a terminal, one line in a log).
        restore_best: load the best epoch's weights at the end.
        num_threads: torch intra-op threads while training (restored afterwards); ``"auto"`` uses 1 for conv-free
            models on CPU (several times faster for these small GEMMs on a busy machine).

    Returns:
        The :class:`TrainingHistory`; the model ends in eval mode.
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
    model.to(device)
    threads = resolve_threads(model, device, num_threads)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_loop(
            model, x_train, x_val, epochs, batch_size, lr, seed, device, None if out is None else Path(out),
            patience, progress, restore_best,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


class _RunFolder:
    """``metrics.csv`` (one row per epoch) and ``checkpoints/{last,best}`` of a run folder (nothing without one)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir, self.file, self.writer = out_dir, None, None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.csv", "w", newline="")  # noqa: SIM115  (closed in close())
            self.writer = csv.DictWriter(self.file, fieldnames=METRIC_COLUMNS)
            self.writer.writeheader()

    def epoch(self, model: nn.Module, row: dict[str, float], improved: bool) -> None:
        """Append ``row`` and checkpoint the weights (``best`` too when ``improved``)."""
        if self.writer is None:
            return
        from vaefast.models.io import save

        self.writer.writerow(row)
        self.file.flush()  # type: ignore[union-attr]
        save(model, self.out_dir / "checkpoints" / "last")  # type: ignore[operator]
        if improved:
            save(model, self.out_dir / "checkpoints" / "best")  # type: ignore[operator]

    def close(self) -> None:
        """Close ``metrics.csv``."""
        if self.file is not None:
            self.file.close()


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    batch_size: int,
    device: torch.device,
    generators: tuple[torch.Generator, torch.Generator],
) -> dict[str, float]:
    """One shuffled pass (``generators``: shuffle, noise); the point-weighted means of the batch terms."""
    shuffle_gen, noise_gen = generators
    n = x_train.shape[0]
    sums = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
    for idx in index_batches(n, batch_size, torch.randperm(n, generator=shuffle_gen)):
        xb = x_train[idx].to(device, non_blocking=True)
        terms = model.loss(xb, dataset_size=n, generator=noise_gen)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        retract_(model)  # orthonormal layers: once per step, so the next forward uses the weights as they are
        sums += _terms_vector(terms) * xb.shape[0]  # stays on the device: one read per epoch
    return dict(zip(TERMS, (sums / n).tolist(), strict=True))


def _epoch_row(
    model: nn.Module, epoch: int, means: dict[str, float], x_val: torch.Tensor | None, batch_size: int, seed: int
) -> dict[str, float]:
    """The ``METRIC_COLUMNS`` row of an epoch (validation by :func:`evaluate`; ``seconds`` filled by the caller)."""
    if not math.isfinite(means["loss"]):
        raise FloatingPointError(f"training diverged at epoch {epoch} (loss {means['loss']}); try a lower lr")
    val = evaluate(model, x_val, batch_size=max(batch_size, 256), seed=seed) if x_val is not None else None
    row = {f"train_{k}": v for k, v in means.items()}
    row.update({f"val_{k}": (float("nan") if val is None else val[k]) for k in TERMS})
    row["epoch"], row["seconds"] = epoch, float("nan")
    return {k: row[k] for k in METRIC_COLUMNS}


def _train_loop(
    model: nn.Module, x_train: torch.Tensor, x_val: torch.Tensor | None, epochs: int, batch_size: int, lr: float,
    seed: int, device: torch.device, out_dir: Path | None, patience: int | None, progress: bool, restore_best: bool,
) -> TrainingHistory:  # fmt: skip
    """The epochs of :func:`train` (arguments already checked)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generators = (_generator(seed, "shuffle"), _generator(seed, "noise", device))
    history, best_state, folder = TrainingHistory(out=out_dir), None, _RunFolder(out_dir)
    start = time.perf_counter()
    bar = progress_bar(range(1, epochs + 1), desc="train", unit="epoch", total=epochs, enabled=progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            try:
                means = _train_epoch(model, optimizer, x_train, batch_size, device, generators)
            except RuntimeError as exc:  # an update too large for the weights' dtype: the run diverged
                if "overflow" not in str(exc):
                    raise
                raise FloatingPointError(f"training diverged at epoch {epoch} ({exc}); try a lower lr") from exc
            row = _epoch_row(model, epoch, means, x_val, batch_size, seed)
            row["seconds"] = time.perf_counter() - t0
            history.rows.append(row)
            score = row["val_elbo"] if x_val is not None else row["train_elbo"]
            improved = score > history.best_elbo
            if improved:
                history.best_epoch, history.best_elbo = epoch, score
                best_state = copy.deepcopy(model.state_dict())
            folder.epoch(model, row, improved)
            bar.set_postfix(train_elbo=f"{row['train_elbo']:.2f}", val_elbo=f"{row['val_elbo']:.2f}")
            if patience is not None and epoch - history.best_epoch >= patience:
                history.stopped_early = True
                break
    finally:
        bar.close()
        folder.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.seconds = time.perf_counter() - start
    if out_dir is not None:
        from vaefast.models.io import save

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

    Args:
        model: a protocol model (run in eval mode; the caller's modes are restored).
        x: the points.
        num_samples: ``K``.
        seed: the noise comes from a generator seeded with ``derive_seed(seed, "training", "iwae")``.
        max_batch_elements: latent samples per batch: points are processed ``max(1, max_batch_elements // K)`` at
            a time.

    Returns:
        ``[N]`` the bound per point.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("max_batch_elements", max_batch_elements)
    xs = as_images(x, "x", model)
    device = _device(model, xs)
    gen = _generator(seed, "iwae", device)
    out = []
    with eval_mode(model):
        for idx in index_batches(xs.shape[0], points_per_batch(num_samples, 1, max_batch_elements)):
            xb = xs[idx].to(device)
            mu, logvar = model.encode(xb)
            z = sample_latent(mu, logvar, num_samples, gen)
            b, k = z.shape[:2]
            log_px_z = model.log_likelihood(repeat_per_sample(xb, k), z.reshape(b * k, -1)).reshape(b, k)
            log_pz = gaussian_log_density(z, 0.0, 0.0).sum(-1)
            log_qz = gaussian_log_density(z, mu.unsqueeze(1), logvar.unsqueeze(1)).sum(-1)
            out.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=1) - math.log(num_samples))
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
        return gaussian_log_density(b, mean, 2.0 * math.log(std)).flatten(1).sum(1)
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
    device = _device(model, x)
    kl_sum, sigma_sum = None, 0.0
    with eval_mode(model):
        for idx in index_batches(x.shape[0], batch_size):
            mu, logvar = model.encode(x[idx].to(device))
            kl = gaussian_kl(mu, logvar, per_dimension=True).sum(0)
            kl_sum = kl if kl_sum is None else kl_sum + kl
            sigma_sum += float(torch.exp(0.5 * logvar).sum())
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
