"""Sweeps over models × data points × radii r (× attack budgets), written to an SQLite store as they run.

Work decomposition. The sweep is enumerated deterministically into **work units**: one model, one radius r
and one block of ``batch_size`` consecutive points (positions ``first_pos .. first_pos + n_points - 1`` of
the point list), in the order models × radii × blocks. A unit is computed as one batch and committed in one
transaction (:mod:`vaefast.store`), so it is the unit of resume and of sharding: under ``torchrun`` with N
processes, rank k computes the units with index ``i ≡ k (mod N)`` (no padding, no duplicates) and rank 0
merges the per-rank shard databases into one. Each unit yields one ``results`` row per (model, point, r) and
one ``curves`` row per (model, point, r, eps).

Determinism. Every random number is keyed by the item's identity, never by execution order:
Monte-Carlo estimates use ``seed = H(base seed, "mc", model, r)`` with ``point_offset = pos`` (the counter-based
sampler keys noise by global point index); the margin search decides on that same stream (its attacks use it as
their seed too, with ``point_ids = pos``); the curves' attacks use ``H(base seed, "curve", model, r)``; H is
SHA-256. A unit therefore gives the same numbers whichever process computes it, in whatever order, so sharded,
resumed and uninterrupted runs produce identical tables (timings, kept in ``units``, excepted). Bit-for-bit
equality across runs also needs the same number of intra-op threads (``OMP_NUM_THREADS``): CPU reductions may
split by thread.

Per (model, point, r), in stages: p̂_r(x) with its Clopper-Pearson interval and r*(x)
(``estimate_r_robustness``); the bound variants and components from that same estimate (``margin_bound``); the
numerical margin by batched bisection from that same clean-point decision (``numerical_margin(estimate=...)``)
with its evidence — the perturbation δ that broke r-robustness at the margin and the p̂ the search saw there —
and the likelihood degradation and reconstruction under that δ. Per (model, point, r, eps) for r in
``curve_radii``: p̂_r under the max-damage attack with ‖δ‖ ≤ eps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaefast import store
from vaefast._checks import (
    analysis,
    as_radii,
    check_model,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
    model_input_shape,
)
from vaefast.attacks.base import max_perturbation
from vaefast.rng import derive_seed

# ----------------------------------------------------------------------------------------------------------
# identities and seeds

SWEEP_FORMAT = "3"  # bump when the per-unit computation changes: resuming across versions is then refused


class SweepMismatchError(ValueError):
    """The database holds a different sweep (other models, points or specification) than the one asked for."""


def _rkey(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True)
class WorkUnit:
    """One model, one radius and a block of consecutive point positions: computed and committed as a batch."""

    model: str
    r: float
    first_pos: int
    n_points: int

    @property
    def unit_id(self) -> str:
        return f"{self.model}|r={_rkey(self.r)}|pos={self.first_pos}:{self.first_pos + self.n_points}"

    @property
    def positions(self) -> range:
        return range(self.first_pos, self.first_pos + self.n_points)


def item_id(model: str, r: float, pos: int) -> str:
    """Stable id of a (model, point, r) result row."""
    return f"{model}|r={_rkey(r)}|pos={pos}"


def curve_item_id(model: str, r: float, eps: float, pos: int) -> str:
    """Stable id of a (model, point, r, eps) curve row."""
    return f"{model}|r={_rkey(r)}|eps={_rkey(eps)}|pos={pos}"


def enumerate_units(
    model_names: Sequence[str], n_points: int, radii: Sequence[float], batch_size: int
) -> list[WorkUnit]:
    """All work units of a sweep in their canonical order (models × radii × point blocks)."""
    check_positive_int("n_points", n_points)
    check_positive_int("batch_size", batch_size)
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"model names must be unique, got {list(model_names)}")
    units = []
    for name in model_names:
        for r in radii:
            for start in range(0, n_points, batch_size):
                units.append(WorkUnit(name, float(r), start, min(batch_size, n_points - start)))
    return units


def shard(units: Sequence[WorkUnit], rank: int, world_size: int) -> list[WorkUnit]:
    """The units of process ``rank`` out of ``world_size``: indices ``i ≡ rank (mod world_size)``."""
    check_positive_int("world_size", world_size)
    check_positive_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return list(units[rank::world_size])


# ----------------------------------------------------------------------------------------------------------
# inputs: points and models


@dataclass
class PointSet:
    """The swept data points: ``x[P, *input_shape]`` plus where they came from (dataset, split, indices)."""

    x: torch.Tensor
    dataset: str = "tensor"
    split: str = ""
    indices: list[int] = field(default_factory=list)
    labels: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.dim() < 2 or self.x.shape[0] == 0:
            raise ValueError("points.x must be a tensor [P, *input_shape] with P >= 1")
        if not self.indices:
            self.indices = list(range(self.x.shape[0]))
        if len(self.indices) != self.x.shape[0]:
            raise ValueError(f"points.indices has {len(self.indices)} entries for {self.x.shape[0]} points")

    @classmethod
    def from_dataset(
        cls, name: str, split: str = "test", indices: Sequence[int] | int = 32, root: str | None = None
    ) -> PointSet:
        """Points ``indices`` (or the first ``indices`` points) of ``vaefast.data.load(name, split)``."""
        from vaefast.data import load

        data = load(name, split=split, root=root)
        n = data.x.shape[0]
        if isinstance(indices, int):
            check_positive_int("indices", indices)
            if indices > n:
                raise ValueError(f"asked for {indices} points but {name}/{split} holds only {n}")
            indices = list(range(indices))
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0 or max(indices) >= n:
            raise ValueError(f"indices must be non-empty and within [0, {n}) for {name}/{split}")
        idx = torch.tensor(indices)
        labels = data.y[idx].tolist() if getattr(data, "y", None) is not None else None
        return cls(data.x[idx].contiguous(), dataset=name, split=split, indices=indices, labels=labels)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(store.to_blob(self.x)).hexdigest()
        return {"dataset": self.dataset, "split": self.split, "indices": self.indices, "x_sha256": digest}


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def load_models(
    models: Mapping[str, nn.Module | str | os.PathLike] | Sequence[str | os.PathLike],
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Resolve ``{name: model or run folder}`` (or a list of run folders, named by folder) to modules."""
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not isinstance(models, Mapping):
        models = {Path(p).name: p for p in models}
    if not models:
        raise ValueError("models is empty")
    loaded, sources = {}, {}
    for name, m in models.items():
        if not isinstance(name, str) or not name or "|" in name:
            raise ValueError(f"model names must be non-empty strings without '|', got {name!r}")
        if isinstance(m, nn.Module):
            loaded[name], sources[name] = m, "<memory>"
        elif isinstance(m, (str, os.PathLike)):
            from vaefast.models import load

            loaded[name], sources[name] = load(m), str(m)
        else:
            raise TypeError(f"models[{name!r}] must be an nn.Module or a run folder, got {type(m).__name__}")
        try:
            check_model(loaded[name])
        except TypeError as exc:
            raise TypeError(f"models[{name!r}]: {exc}") from None
        if not callable(getattr(loaded[name], "log_likelihood", None)):
            raise TypeError(f"models[{name!r}] does not implement the model protocol (no 'log_likelihood')")
    return loaded, sources


def model_row(name: str, model: nn.Module, source: str) -> dict[str, Any]:
    """The ``models`` table row; ``beta`` is the KL weight (β-VAE/ELBO) or the TC weight (β-TCVAE)."""
    cfg = _config_dict(model)
    objective = cfg.get("objective")
    beta = cfg.get("tc_weight") if objective == "beta_tcvae" else cfg.get("beta")
    return {
        "name": name,
        "source": source,
        "config": json.dumps(cfg, sort_keys=True, default=str),
        "beta": float(beta) if isinstance(beta, (int, float)) else None,
        "objective": objective,
        "latent_dim": int(model.latent_dim),
        "input_shape": json.dumps(list(model.input_shape)),
        "likelihood": str(getattr(model, "likelihood", "")),
        "weights_sha256": _weights_digest(model),
    }


# ----------------------------------------------------------------------------------------------------------
# choosing r

AUTO_R_QUANTILES = (0.25, 0.5, 0.75, 0.95)
AUTO_R_ABOVE = 1.3


def auto_radii(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    num_samples: int = 500,
    seed: int = 0,
    quantiles: Sequence[float] = AUTO_R_QUANTILES,
    above: float = AUTO_R_ABOVE,
) -> list[float]:
    """Radii r for a sweep from the smallest robust radii ``r*(x)`` of the points, pooled over the models.

    A point is r-robust exactly when ``r > r*(x)`` (up to Monte-Carlo noise), so a radius below most ``r*`` leaves
    most points uncertified (margin 0) and one far above them makes every reconstruction ball cover the decoder's
    whole range. The radii are the ``quantiles`` of the pooled ``r*`` and ``above`` × the largest of them, rounded
    to 3 significant digits: every model is studied on both sides of its typical ``r*``.

    Args:
        models: ``{name: model}``.
        x: the swept points ``[P, *input_shape]``.
        num_samples: Monte-Carlo samples of the pilot estimate of ``r*``.
        seed: base seed (the pilot's stream is derived from it and each model's name).
        quantiles: quantiles of the pooled ``r*`` to use.
        above: factor for one radius above the largest quantile.

    Returns:
        Distinct sorted radii.
    """
    from vaefast.robustness import estimate_r_robustness

    pooled = []
    for name, model in models.items():
        param = next(iter(model.parameters()), None)
        xs = x if param is None else x.to(device=param.device, dtype=param.dtype)
        pilot = derive_seed(seed, "auto-radii", name)
        pooled.append(estimate_r_robustness(model, xs, [1.0], num_samples=num_samples, seed=pilot).r_star)
    r_star = torch.cat(pooled).double()
    qs = torch.quantile(r_star, torch.tensor([float(q) for q in quantiles], dtype=torch.float64)).tolist()
    return sorted({float(f"{v:.3g}") for v in [*qs, above * qs[-1]] if v > 0})


# ----------------------------------------------------------------------------------------------------------
# the sweep specification


@dataclass
class SweepSpec:
    """What to compute besides models and points (see the module docstring).

    ``attack_eps``: budgets of the p̂-vs-attack-norm curves (empty: no curves), computed at the radii
    ``curve_radii`` (default: every radius). ``margin_tol``: absolute tolerance of the bisection;
    ``margin_max_radius``: bracket limit (None: the margin module's default). ``*_kwargs`` go to
    ``numerical_margin`` and ``MaxDamageAttack``.
    """

    radii: list[float]
    attack_eps: list[float] = field(default_factory=list)
    curve_radii: list[float] | None = None
    num_samples: int = 500
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 16
    margin_tol: float = 0.01
    margin_max_radius: float | None = None
    margin_kwargs: dict[str, Any] = field(default_factory=dict)
    attack_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.radii = [float(r) for r in as_radii("radii", self.radii).tolist()]
        if len(set(self.radii)) != len(self.radii):
            raise ValueError(f"radii must be distinct, got {self.radii}")
        self.attack_eps = (
            [float(e) for e in as_radii("attack_eps", self.attack_eps).tolist()] if self.attack_eps else []
        )
        if self.curve_radii is not None:
            self.curve_radii = [float(r) for r in as_radii("curve_radii", self.curve_radii).tolist()]
            unknown = set(self.curve_radii) - set(self.radii)
            if unknown:
                raise ValueError(f"curve_radii must be among radii, got {sorted(unknown)}")
        check_positive_int("num_samples", self.num_samples)
        check_probability("confidence", self.confidence)
        check_seed("seed", self.seed)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("margin_tol", self.margin_tol)
        if self.margin_max_radius is not None:
            check_positive_float("margin_max_radius", self.margin_max_radius)

    def curves_at(self, r: float) -> bool:
        return bool(self.attack_eps) and (self.curve_radii is None or r in self.curve_radii)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------------------
# computing one unit


def _f(t: torch.Tensor, i: int) -> float:
    return float(t.reshape(-1)[i])


class _Timer:
    """Wall-clock seconds per stage: ``with timer("margin"): ...`` adds to ``timer.seconds["seconds_margin"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"seconds_{stage}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0


def _likelihood_terms(model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """log p(x|μ(x)), log p(x|μ(x+δ)), their drop in nats and the relative degradation (``likelihood_degradation``)."""
    from vaefast.attacks import likelihood_degradation

    deg = likelihood_degradation(model, x, delta)
    return {"ll_clean": deg.log_lik_clean, "ll_adv": deg.log_lik_adv, "rel": deg.relative, "drop": deg.drop}


_MARGIN_ATTACK_KEYS = ("restarts", "steps", "num_noise_samples", "mode", "optimizer", "box")


def margin_settings(spec: SweepSpec) -> dict[str, Any]:
    """Keyword arguments of :func:`~vaefast.margin.numerical_margin` for a sweep: bisection at ``margin_tol``, the
    sweep's sample count and confidence, the max-damage attack's settings unless ``margin_kwargs`` overrides them."""
    shared = {k: v for k, v in spec.attack_kwargs.items() if k in _MARGIN_ATTACK_KEYS}
    kwargs = {
        "method": "bisection",
        "tol": spec.margin_tol,
        "num_samples": spec.num_samples,
        "confidence": spec.confidence,
        **shared,
        **spec.margin_kwargs,
    }
    if spec.margin_max_radius is not None:
        kwargs.setdefault("max_radius", spec.margin_max_radius)
    return kwargs


def _clean_columns(est, mb, b: int) -> dict[str, Any]:
    """The clean point's estimate and bound columns of results row ``b``."""
    cols = {
        "p_hat": _f(est.p_hat, b),
        "ci_low": _f(est.ci_low, b),
        "ci_high": _f(est.ci_high, b),
        "hits": int(est.hits.reshape(-1)[b]),
        "num_samples": int(est.num_samples),
        "robust": int(bool(est.robust.reshape(-1)[b])),
        "r_star": _f(est.r_star, b),
        "certified": int(bool(mb.certified.reshape(-1)[b])),
    }
    for name in ("bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min"):
        cols[name] = _f(getattr(mb, name), b)
    cols["jac_frobenius"], cols["jac_spectral"] = _f(mb.jac_frobenius, b), _f(mb.jac_spectral, b)
    return cols


_EVIDENCE_COLUMNS = (
    "adv_norm", "p_hat_adv", "ci_low_adv", "ci_high_adv", "hits_adv", "num_samples_adv", "ll_clean", "ll_adv",
    "ll_drop", "rel_ll_degradation", "delta", "recon_adv",
)  # fmt: skip


def _evidence_columns(model: nn.Module, x: torch.Tensor, nm) -> list[dict[str, Any]]:
    """Per point the evidence of its margin: the breaking δ the search returned, the p̂ it saw there, and the
    likelihood degradation and reconstruction under that same δ (NULL where the margin is 0 or unbracketed)."""
    has = ((nm.margin > 0) & nm.bracketed).tolist()
    out: list[dict[str, Any]] = [dict.fromkeys(_EVIDENCE_COLUMNS) for _ in has]
    idx = [b for b, h in enumerate(has) if h]
    if not idx:
        return out
    sel = torch.tensor(idx, device=x.device)
    delta = nm.delta[sel].to(x.dtype)
    terms = _likelihood_terms(model, x[sel], delta)
    with torch.no_grad():
        recon_adv = model.decode(model.encode(x[sel] + delta)[0])
    for j, b in enumerate(idx):
        out[b] = {
            "adv_norm": float(delta[j].flatten().double().norm()),
            "p_hat_adv": _f(nm.p_hat_delta, b),
            "ci_low_adv": _f(nm.ci_low_delta, b),
            "ci_high_adv": _f(nm.ci_high_delta, b),
            "hits_adv": int(nm.hits_delta[b]),
            "num_samples_adv": int(nm.samples_delta[b]),
            "ll_clean": _f(terms["ll_clean"], j),
            "ll_adv": _f(terms["ll_adv"], j),
            "ll_drop": _f(terms["drop"], j),
            "rel_ll_degradation": _f(terms["rel"], j),
            "delta": store.to_blob(delta[j]),
            "recon_adv": store.to_blob(recon_adv[j]),
        }
    return out


def _curve_rows(model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec, seed_mc: int) -> list[dict]:
    """``curves`` rows: p̂_r and likelihood degradation under the max-damage attack with ‖δ‖ ≤ eps, every eps."""
    from vaefast.attacks import MaxDamageAttack
    from vaefast.robustness import estimate_r_robustness

    name, r, a = unit.model, unit.r, unit.first_pos
    seed_curve = derive_seed(spec.seed, "curve", name, _rkey(r))
    attack = MaxDamageAttack(model, eps=list(spec.attack_eps), seed=seed_curve, **spec.attack_kwargs)
    adv = attack.attack(x, point_ids=torch.arange(a, a + unit.n_points))
    deltas = adv.delta.detach().reshape(len(spec.attack_eps), *x.shape)
    rows = []
    for e, eps in enumerate(spec.attack_eps):
        d = deltas[e]
        est = estimate_r_robustness(
            model, x, [r], num_samples=spec.num_samples, delta=d, seed=seed_mc, confidence=spec.confidence,
            point_offset=a,
        )  # fmt: skip
        terms = _likelihood_terms(model, x, d)
        norms = d.flatten(1).norm(dim=1)
        for b, pos in enumerate(unit.positions):
            rows.append(
                {
                    "item_id": curve_item_id(name, r, eps, pos),
                    "unit_id": unit.unit_id,
                    "model": name,
                    "pos": pos,
                    "r": r,
                    "eps": eps,
                    "p_hat": _f(est.p_hat, b),
                    "ci_low": _f(est.ci_low, b),
                    "ci_high": _f(est.ci_high, b),
                    "adv_norm": _f(norms, b),
                    "ll_drop": _f(terms["drop"], b),
                    "rel_ll_degradation": _f(terms["rel"], b),
                }
            )
    return rows


@analysis
def compute_unit(
    model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Compute one work unit: estimate → bound → margin with its evidence → curves.

    The clean point is decided once: the estimate ``est`` feeds both the bound and the margin search
    (``estimate=est``), so a point is certified by the bound exactly when the search treats it as r-robust.

    Args:
        model: a protocol model (eval mode is applied by every stage).
        x: the unit's points ``[n_points, *input_shape]`` on the model's device.
        unit: the work unit (model name, r, first point position).
        spec: the sweep specification.

    Returns:
        ``(units row, results rows, curves rows)`` as dicts keyed by the store's column names.
    """
    from vaefast.margin import numerical_margin
    from vaefast.robustness import estimate_r_robustness, margin_bound

    r, a, name = unit.r, unit.first_pos, unit.model
    seed_mc = derive_seed(spec.seed, "mc", name, _rkey(r))
    timer = _Timer()
    with timer("total"):
        with timer("estimate"):
            est = estimate_r_robustness(
                model, x, [r], num_samples=spec.num_samples, seed=seed_mc, confidence=spec.confidence, point_offset=a
            )
        with timer("bound"):
            mb = margin_bound(model, x, r, point_offset=a, estimate=est)
        with timer("margin"):
            settings = margin_settings(spec)
            nm = numerical_margin(model, x, r, seed=seed_mc, point_offset=a, estimate=est, progress=False, **settings)
        with timer("evidence"):
            evidence = _evidence_columns(model, x, nm)
            with torch.no_grad():
                recon_clean = model.decode(model.encode(x)[0])
            box_limit = max_perturbation(x, settings.get("box", (0.0, 1.0)))
        with timer("curve"):
            curves = _curve_rows(model, x, unit, spec, seed_mc) if spec.curves_at(r) else []
    results = []
    for b, pos in enumerate(unit.positions):
        row = {"item_id": item_id(name, r, pos), "unit_id": unit.unit_id, "model": name, "pos": pos, "r": r}
        row.update(seed=seed_mc, **_clean_columns(est, mb, b))
        row.update(
            max_radius=None if box_limit is None else float(box_limit[b]),
            margin=_f(nm.margin, b),
            margin_lower=_f(nm.lower, b),
            bracketed=int(bool(nm.bracketed[b])),
            margin_evals=len(nm.evaluations[b]),
            recon_clean=store.to_blob(recon_clean[b]),
            **evidence[b],
        )
        results.append(row)
    unit_row = {"unit_id": unit.unit_id, "model": name, "r": r, "first_pos": a, "n_points": unit.n_points}
    return {**unit_row, **timer.seconds}, results, curves


# ----------------------------------------------------------------------------------------------------------
# distributed context


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _dist_context() -> _Dist:
    """Rank/world size from ``torchrun``'s environment; joins a gloo group (for barriers) when N > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))

    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), owns)


def shard_dir(db: str | Path) -> Path:
    db = Path(db)
    return db.parent / (db.name + ".shards")


def _merge_shards(conn, db: Path) -> int:
    added = 0
    sdir = shard_dir(db)
    if sdir.is_dir():
        for path in sorted(sdir.glob("rank*.db")):
            added += store.merge_into(conn, path)
        for path in sorted(sdir.iterdir()):
            path.unlink()
        sdir.rmdir()
    return added


# ----------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class SweepResult:
    """What a sweep did: the database, units computed here / skipped (already done), wall time."""

    db: Path
    units_total: int
    units_computed: int
    units_skipped: int
    seconds: float
    rank: int = 0
    world_size: int = 1


def _prepare_db(db: Path, fingerprint: str, spec: SweepSpec, models_rows, points_rows, describe, resume: bool):
    conn = store.connect(db)
    meta = store.get_meta(conn)
    has_rows = bool(conn.execute("SELECT 1 FROM units LIMIT 1").fetchone()) or shard_dir(db).is_dir()
    if "fingerprint" in meta and meta["fingerprint"] != fingerprint:
        conn.close()
        raise SweepMismatchError(f"db {str(db)!r} holds a different sweep (other models/points/spec); use another file")
    if has_rows and not resume:
        conn.close()
        raise ValueError(f"db {str(db)!r} already holds results: pass resume=True (--resume) or remove it")
    if "fingerprint" not in meta:
        from vaefast import __version__

        store.set_meta(
            conn,
            {
                "fingerprint": fingerprint,
                "spec": spec.to_json(),
                "points": json.dumps(describe),
                "vaefast_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    store.write_models_and_points(conn, models_rows, points_rows)
    return conn


def run_sweep(
    models: Mapping[str, nn.Module | str | os.PathLike] | Sequence[str | os.PathLike],
    points: PointSet | torch.Tensor,
    radii: Sequence[float] | float | str,
    db: str | os.PathLike,
    *,
    attack_eps: Sequence[float] = (),
    curve_radii: Sequence[float] | None = None,
    num_samples: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
    margin_tol: float = 0.01,
    margin_max_radius: float | None = None,
    margin_kwargs: Mapping[str, Any] | None = None,
    attack_kwargs: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Run (or resume) a sweep of ``models`` × ``points`` × ``radii`` into the SQLite database ``db``.

    Under ``torchrun`` every process calls this with the same arguments; units are sharded by index and merged
    into ``db`` by rank 0.

    Args:
        models: ``{name: nn.Module or run folder}`` (or a list of run folders).
        points: a :class:`PointSet` or a tensor ``[P, *input_shape]``.
        radii: the reconstruction radii r, or ``"auto"``: quantiles of the points' smallest robust radii r*
            (:func:`auto_radii`, from a pilot estimate with ``num_samples`` samples).
        db: the SQLite results database.
        attack_eps, curve_radii: budgets and radii of the p̂-vs-attack-norm curves.
        num_samples, confidence, seed, batch_size, margin_tol, margin_max_radius, margin_kwargs, attack_kwargs:
            the :class:`SweepSpec`.
        resume: skip the units already in ``db`` (without it an existing non-empty ``db`` is an error).
        progress: show a progress bar.

    Returns:
        A :class:`SweepResult`.
    """
    t_start = time.perf_counter()
    if isinstance(points, torch.Tensor):
        points = PointSet(points)
    if not isinstance(points, PointSet):
        raise TypeError(f"points must be a PointSet or a tensor, got {type(points).__name__}")
    if isinstance(radii, (int, float)):
        radii = [radii]
    loaded, sources = load_models(models)
    for name, m in loaded.items():
        shape = model_input_shape(m, points.x)
        if shape != tuple(points.x.shape[1:]):
            raise ValueError(f"points have shape {tuple(points.x.shape[1:])} but models[{name!r}] expects {shape}")
    if isinstance(radii, str):
        if radii != "auto":
            raise ValueError(f"radii must be numbers or 'auto', got {radii!r}")
        radii = auto_radii(loaded, points.x, num_samples=num_samples, seed=seed)
    spec = SweepSpec(
        radii=list(radii),
        attack_eps=list(attack_eps),
        num_samples=num_samples,
        curve_radii=None if curve_radii is None else list(curve_radii),
        confidence=confidence,
        seed=seed,
        batch_size=batch_size,
        margin_tol=margin_tol,
        margin_max_radius=margin_max_radius,
        margin_kwargs=dict(margin_kwargs or {}),
        attack_kwargs=dict(attack_kwargs or {}),
    )
    db = Path(db)
    models_rows = [model_row(n, m, sources[n]) for n, m in loaded.items()]
    labels = points.labels or [None] * len(points.indices)
    points_rows = [
        {
            "pos": p,
            "dataset": points.dataset,
            "split": points.split,
            "idx": int(i),
            "label": None if lab is None else int(lab),
            "x": store.to_blob(points.x[p]),
        }
        for p, (i, lab) in enumerate(zip(points.indices, labels, strict=True))
    ]
    describe = points.describe()
    fingerprint = hashlib.sha256(
        json.dumps(
            [SWEEP_FORMAT, spec.to_json(), describe, [(r["name"], r["weights_sha256"]) for r in models_rows]]
        ).encode()
    ).hexdigest()
    units = enumerate_units(list(loaded), points.x.shape[0], spec.radii, spec.batch_size)

    dist = _dist_context()
    try:
        error = None
        if dist.rank == 0:
            try:
                conn = _prepare_db(db, fingerprint, spec, models_rows, points_rows, describe, resume)
                _merge_shards(conn, db)  # leftovers of a killed distributed run
                conn.close()
            except ValueError as exc:
                error = (type(exc).__name__, str(exc))
        error = dist.broadcast(error)
        if error is not None:
            kind, message = error
            raise (SweepMismatchError if kind == SweepMismatchError.__name__ else ValueError)(message)
        main = store.connect(db, create=False)
        if store.get_meta(main).get("fingerprint") != fingerprint:
            raise SweepMismatchError(f"db {str(db)!r} holds a different sweep")
        done = store.completed_units(main)
        if dist.world_size > 1:
            main.close()
            out = store.connect(shard_dir(db) / f"rank{dist.rank}.db")
        else:
            out = main
        todo = [u for u in shard(units, dist.rank, dist.world_size) if u.unit_id not in done]
        skipped = len(shard(units, dist.rank, dist.world_size)) - len(todo)
        bar = None
        if progress and dist.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"sweep {db.name}", unit="unit", dynamic_ncols=True)
        try:
            for unit in todo:
                model = loaded[unit.model]
                param = next(iter(model.parameters()), None)
                x = points.x[unit.first_pos : unit.first_pos + unit.n_points]
                if param is not None:
                    x = x.to(device=param.device, dtype=param.dtype)
                unit_row, results, curves = compute_unit(model, x, unit, spec)
                unit_row.update(rank=dist.rank, world_size=dist.world_size)
                store.commit_unit(out, unit_row, results, curves)
                if bar is not None:
                    bar.set_postfix_str(f"{unit.model} r={unit.r:.3g}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            out.close()
        dist.barrier()
        if dist.rank == 0 and dist.world_size > 1:
            conn = store.connect(db)
            _merge_shards(conn, db)
            conn.close()
        dist.barrier()
    finally:
        dist.close()
    return SweepResult(db, len(units), len(todo), skipped, time.perf_counter() - t_start, dist.rank, dist.world_size)
