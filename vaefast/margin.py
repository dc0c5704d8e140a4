"""Numerical robustness margins with their evidence: for every point and reconstruction radius r, where a
maximum-damage attack of growing size breaks r-robustness, as three numbers (SPEC §1):

- ``margin``: the estimate of the smallest ``||delta||_2`` that makes ``p_r(x + delta) <= 1/2`` along the attack's
  path, where ``p_hat`` crosses 1/2 (interpolated from every count the search collected; it converges to the path's
  crossing as the samples grow, and is the original protocol's ``p_hat <= 1/2`` rule in the limit);
- ``upper`` (``margin_upper``): the radius of the evidence, a stored ``delta`` whose ``p_r <= 1/2`` is decided at the
  search's confidence (``vaefast verify`` replays it);
- ``lower`` (``margin_lower``): the largest attacked radius decided r-robust at that confidence (0 if none).

On the linear-Gaussian VAE the true margin lies in ``[lower, upper]`` at no less than the nominal rate. The clean
point is decided once, three-way (:func:`vaefast.core.decide.clean_decision`): not robust gives 0 for all three
(``delta = 0`` is its own evidence), undecided gives no margin (NaN) and is never compared. The search itself
(one attack path per point serving every radius, batched over points and radii) is :mod:`vaefast.core.search`;
this module validates the inputs once and assembles the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vaefast._checks import analysis, as_radii, check_analysis_inputs, check_seed
from vaefast._results import ResultMixin
from vaefast._threads import intra_op_threads
from vaefast.core.box import UNIT_BOX, Box, as_box
from vaefast.core.decide import clean_decision
from vaefast.core.encoding import encode
from vaefast.core.options import MarginOptions, with_overrides
from vaefast.core.sampling import Sampler
from vaefast.core.search import SearchInputs, search
from vaefast.robustness import RRobustnessResult, column_for
from vaefast.stats import clopper_pearson

__all__ = ["NumericalMargin", "numerical_margin"]

CLEAN_NAMES = {1: "robust", -1: "not robust", 0: "undecided"}


@dataclasses.dataclass(repr=False)
class NumericalMargin(ResultMixin):
    """Numerical margins with their evidence, per point (``[B]`` for one radius r, ``[B, K]`` for a list of radii).

    Attributes:
        margin: the estimate (module docstring); 0 where the clean point is not r-robust, NaN where undecided, the
            search limit where the attack never brought ``p_hat`` to 1/2 (``bracketed`` False).
        lower: ``margin_lower``, the largest attacked radius decided r-robust (0 if none).
        upper: ``margin_upper``, the radius of the evidence (``||delta|| = upper``); 0 where the clean point is not
            r-robust; NaN without evidence.
        bracketed: whether there is evidence (a decided break, or a clean point decided not robust).
        delta: ``[B, (K,) *input_shape]`` the breaking perturbations (zeros without evidence or at margin 0).
        p_hat_delta, hits_delta, samples_delta: the counts the search saw at the evidence (the clean counts at
            margin 0; 0 without evidence); ``ci_low_delta``, ``ci_high_delta``: their two-sided Clopper–Pearson
            interval at ``confidence`` (NaN without evidence).
        clean: int8, the clean decision: 1 robust, -1 not robust, 0 undecided.
        evaluations: per point (and radius) the ``(radius, p_hat)`` pairs, the clean point first.
        rows: ``[B]`` attacked inputs per point (each decided for every radius).
        max_radius: ``[B]`` the search limit.
        r: the radius, or the list of radii; ``method``, ``confidence``: the settings; ``point_index``: the global
            point ids keying the random numbers.
    """

    margin: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    bracketed: torch.Tensor
    delta: torch.Tensor
    p_hat_delta: torch.Tensor
    hits_delta: torch.Tensor
    samples_delta: torch.Tensor
    ci_low_delta: torch.Tensor
    ci_high_delta: torch.Tensor
    clean: torch.Tensor
    evaluations: list
    rows: torch.Tensor
    max_radius: torch.Tensor
    r: float | list[float]
    method: str
    confidence: float
    point_index: torch.Tensor

    _PER_ITEM = (
        "margin", "lower", "upper", "bracketed", "p_hat_delta", "hits_delta", "samples_delta", "ci_low_delta",
        "ci_high_delta", "clean",
    )  # fmt: skip
    _SHOW = ("point", "r", "clean", "lower", "margin", "upper", "p_hat_delta", "samples_delta", "rows")

    def counts(self) -> dict[str, int]:
        """Items robust with evidence (comparable), not robust, undecided and unbracketed."""
        c, br = self.clean, self.bracketed
        return {
            "radii": len(self.radii), "robust with evidence": int(((c == 1) & br).sum()),
            "not robust": int((c == -1).sum()), "undecided": int((c == 0).sum()),
            "unbracketed": int(((c == 1) & ~br).sum()),
        }  # fmt: skip

    @property
    def radii(self) -> list[float]:
        """The radii as a list (one entry for a single r)."""
        return list(self.r) if isinstance(self.r, list) else [self.r]

    def at(self, r: float) -> NumericalMargin:
        """The result of one radius (fields ``[B]``).

        Args:
            r: one of :attr:`radii`.

        Returns:
            A single-radius :class:`NumericalMargin`.
        """
        if not isinstance(self.r, list):
            if float(r) != self.r:
                raise ValueError(f"r={r} is not the radius of this result ({self.r})")
            return self
        if float(r) not in self.r:
            raise ValueError(f"r={r} is not among this result's radii {self.r}")
        k = self.r.index(float(r))
        per = {name: getattr(self, name)[:, k] for name in (*self._PER_ITEM, "delta")}
        return dataclasses.replace(self, **per, evaluations=[e[k] for e in self.evaluations], r=float(r))

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per (point, radius), points outer: ``point, r, method``, the per-item fields (the clean
            decision by name), the search limit and the number of attacked inputs.
        """
        rows = []
        for r in self.radii:
            one = self.at(r)
            for b in range(len(one)):
                row: dict[str, Any] = {"point": int(one.point_index[b]), "r": r, "method": one.method}
                row.update({name: getattr(one, name)[b].item() for name in self._PER_ITEM})
                row["clean"] = CLEAN_NAMES[int(one.clean[b])]
                row.update(max_radius=float(one.max_radius[b]), rows=int(one.rows[b]))
                rows.append(row)
        order = {p: i for i, p in enumerate(self.point_index.tolist())}
        return sorted(rows, key=lambda row: (order[row["point"]], self.radii.index(row["r"])))

    @staticmethod
    def concat(parts: list[NumericalMargin]) -> NumericalMargin:
        """The results of consecutive point blocks as one result.

        Args:
            parts: results with the same radii, method and confidence, in point order.

        Returns:
            Their per-point fields concatenated.
        """
        first = parts[0]
        tensors = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(first)
            if isinstance(getattr(first, f.name), torch.Tensor)
        }
        return dataclasses.replace(first, **tensors, evaluations=[e for p in parts for e in p.evaluations])


def _clean(model, x, radii, options: MarginOptions, seed, ids, estimate, sampler) -> tuple[torch.Tensor, ...]:
    """The clean decision and counts ``[B, K]``: from ``estimate`` (checked to describe these inputs and to hold
    every radius) or from ``num_samples`` fresh samples of the search's stream."""
    if estimate is not None:
        cols = [column_for(estimate, float(r), x, model=model) for r in radii.tolist()]
        hits = torch.cat([c.hits for c in cols], 1).cpu()
        n = torch.full_like(hits, cols[0].num_samples)
        return clean_decision(hits, cols[0].num_samples, cols[0].confidence), hits, n
    enc = encode(model, x)
    dev = x.device
    hits = sampler.hits(enc, ids.to(dev), radii.to(dev), seed, 0, options.num_samples).cpu()
    n = torch.full_like(hits, options.num_samples)
    return clean_decision(hits, options.num_samples, options.confidence), hits, n


def _caps(x: torch.Tensor, box: Box | None, options: MarginOptions) -> torch.Tensor:
    """Per-point search limits: ``max_radius`` (checked against the box) or the box's largest perturbation."""
    feasible = None if box is None else box.max_perturbation(x)
    if options.max_radius is None:
        if feasible is None:
            raise ValueError("max_radius is needed without a box (box=None): the search has no other limit")
        return feasible
    caps = torch.full((x.shape[0],), options.max_radius, dtype=torch.float64)
    if feasible is not None and bool((caps > feasible * (1 + 1e-9)).any()):
        i = int((caps > feasible * (1 + 1e-9)).nonzero()[0])
        raise ValueError(
            f"max_radius={options.max_radius:.4g} exceeds the largest perturbation the box allows at point {i} "
            f"({feasible[i].item():.4g})"
        )
    return caps


@analysis
def numerical_margin(
    model: torch.nn.Module,
    x: torch.Tensor,
    r: float | list[float] | torch.Tensor,
    *,
    options: MarginOptions | None = None,
    box: Box | tuple[float, float] | None = UNIT_BOX,
    seed: int = 0,
    point_offset: int = 0,
    estimate: RRobustnessResult | None = None,
    max_memory: int | None = None,
    num_threads: int | str | None = "auto",
    progress: bool = False,
    **settings: Any,
) -> NumericalMargin:
    """Numerical margins of every point at one radius r or many (module docstring), with their evidence.

    Args:
        model: a protocol model (run in eval mode; the caller's mode is restored).
        x: points ``[B, *input_shape]`` inside the box (an ``as_vae`` model learns its input shape from them).
        r: the reconstruction radius (fields ``[B]``), or a list of radii (fields ``[B, K]``): one attack path per
            point serves them all.
        options: the search settings (:class:`~vaefast.core.options.MarginOptions`); ``**settings`` overrides its
            fields, e.g. ``tol=0.02, steps=20, method="grid"``.
        box: the data range (a :class:`~vaefast.core.box.Box` or ``(low, high)``), or None for unbounded inputs (then
            ``max_radius`` is required).
        seed, point_offset: Monte-Carlo and attack random numbers are keyed by ``(seed, point_offset + b)``.
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` of exactly these points (with a column for every
            radius): the clean point is then decided from its counts, as the bound and the certificate decide it.
        max_memory: the working-set budget in bytes (None: the device's default).
        num_threads: intra-op threads of the search (``"auto"``: one for a conv-free model on a CPU, whose small
            batches only slow down with more on a shared machine; :mod:`vaefast._threads`), an int, or None (torch's
            setting).
        progress: show progress (a bar on a terminal, one line in a log).
        **settings: fields of :class:`~vaefast.core.options.MarginOptions`.

    Returns:
        A :class:`NumericalMargin`.
    """
    options = with_overrides(options, MarginOptions, settings)
    x, _, _ = check_analysis_inputs(model, x)
    radii = as_radii("r", r)
    single = not isinstance(r, (list, tuple, torch.Tensor)) or (isinstance(r, torch.Tensor) and r.dim() == 0)
    box = as_box(box)
    seed, point_offset = check_seed("seed", seed), check_seed("point_offset", point_offset)
    caps = _caps(x, box, options)
    ids = torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64)
    sampler = Sampler(model, x.device, max_memory)
    clean, hits, n = _clean(model, x, radii, options, seed, ids, estimate, sampler)
    with intra_op_threads(model, x.device, num_threads):
        res = margins_validated(
            model, x, encode(model, x), radii, ids, (clean, hits, n), options, box, seed, sampler, progress, caps
        )
    return res.at(float(radii[0])) if single else res


def margins_validated(
    model: Any,
    x: torch.Tensor,
    enc: Any,
    radii: torch.Tensor,
    ids: torch.Tensor,
    clean: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    options: MarginOptions,
    box: Box | None,
    seed: int,
    sampler: Sampler,
    progress: bool = False,
    caps: torch.Tensor | None = None,
) -> NumericalMargin:
    """:func:`numerical_margin` for a list of radii on validated inputs (the internal core's entry: the sweep's
    margin stage).

    Args:
        model: a protocol model in eval mode.
        x: validated points on the model's device; ``enc`` their clean :class:`~vaefast.core.encoding.Encoding`.
        radii: ``[K]`` float64; ``ids``: ``[B]`` int64 global point ids (CPU).
        clean: ``(decision, hits, samples)``, each ``[B, K]`` (CPU): the clean decision and its counts.
        options, box, seed, sampler, progress: as in :func:`numerical_margin`.
        caps: the per-point search limits (default from ``options`` and ``box``).

    Returns:
        The ``[B, K]`` :class:`NumericalMargin`.
    """
    caps = _caps(x, box, options) if caps is None else caps
    offsets = None if box is None else box.offsets(x)
    inp = SearchInputs(model, x, enc, ids, radii, *clean, caps, offsets, options, seed, sampler)
    if options.one_at_a_time:
        return _result(_stack([_one(inp, b, box) for b in range(x.shape[0])]), inp, options, radii)
    return _result(search(inp, progress, box), inp, options, radii)


def _one(inp: SearchInputs, b: int, box: Box | None):
    """The search of point ``b`` alone (the original protocol's execution)."""
    sel = torch.arange(b, b + 1)
    dev = inp.x.device
    offsets = None if inp.offsets is None else (inp.offsets[0][b : b + 1], inp.offsets[1][b : b + 1])
    part = dataclasses.replace(
        inp, x=inp.x[b : b + 1], enc=inp.enc.take(sel.to(dev)), ids=inp.ids[sel], clean=inp.clean[sel],
        clean_hits=inp.clean_hits[sel], clean_n=inp.clean_n[sel], caps=inp.caps[sel], offsets=offsets,
    )  # fmt: skip
    return search(part, False, box)


def _stack(parts: list) -> Any:
    """Search results of single points as one."""
    first = parts[0]
    fields = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in parts]
        fields[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [e for v in values for e in v]
    return type(first)(**fields)


def _result(found, inp: SearchInputs, options: MarginOptions, radii: torch.Tensor) -> NumericalMargin:
    """The public result of a search (``[B, K]`` fields)."""
    has = found.samples > 0
    p_hat = torch.where(has, found.hits.to(torch.float64) / found.samples.clamp_min(1), torch.nan)
    low, high = clopper_pearson(found.hits, found.samples.clamp_min(1), options.confidence)
    return NumericalMargin(
        margin=found.margin, lower=found.lower, upper=found.upper, bracketed=found.bracketed, delta=found.delta,
        p_hat_delta=p_hat, hits_delta=found.hits, samples_delta=found.samples,
        ci_low_delta=torch.where(has, low, torch.nan), ci_high_delta=torch.where(has, high, torch.nan),
        clean=inp.clean, evaluations=found.evaluations, rows=found.rows, max_radius=inp.caps,
        r=[float(v) for v in radii.tolist()], method=options.method, confidence=options.confidence,
        point_index=inp.ids,
    )  # fmt: skip
