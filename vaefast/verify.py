"""Replay the evidence stored in a sweep database with independent random numbers (``vaefast verify``).

Every results row makes up to two claims:

- ``"delta"`` (certified rows whose margin search found a decided break): the stored perturbation δ breaks
  r-robustness, i.e. ``p_r(x, δ) <= 1/2``. Checked exactly first (‖δ‖₂ equals ``margin_upper``, x + δ lies in the box,
  the stored ``p_hat_adv = hits_adv / num_samples_adv <= 1/2``), then statistically: a fresh Monte-Carlo estimate
  of ``p_r(x, δ)`` with ``factor`` × the sweep's sample count, on a Philox stream keyed by
  ``H(row seed, "verify", seed)`` (independent of every stream the sweep used), and its two-sided Clopper–Pearson
  interval at ``confidence``. The claim is **confirmed** unless the interval lies entirely above 1/2
  (``ci_low > 1/2``: the fresh samples show, at that confidence, that x + δ is r-robust).
- ``"clean"`` (certified rows, decided robust at the sweep's confidence): the clean point is r-robust,
  ``p_r(x, 0) > 1/2``; confirmed unless the
  fresh interval lies entirely at or below 1/2 (``ci_high <= 1/2``).

For a true claim each check fails with probability at most ``(1 - confidence) / 2``; a perturbation that was
tampered with (zeroed, rescaled, moved) fails the exact checks, and a δ that does not break the point fails the
statistical one with a power that grows with ``factor``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaefast import store
from vaefast._checks import check_positive_int, check_probability, check_seed
from vaefast._progress import progress_bar
from vaefast._version import version_note
from vaefast.rng import derive_seed, id_runs
from vaefast.robustness import estimate_r_robustness
from vaefast.sweep.inputs import load_stored_models
from vaefast.sweep.spec import SweepSpec

__all__ = ["VerifyReport", "verify_sweep"]

KINDS = ("delta", "clean")


@dataclasses.dataclass
class VerifyReport:
    """The outcome of :func:`verify_sweep`.

    Attributes:
        db: the database checked.
        rows: one ``verifications`` row per checked claim (also written to the database).
        confidence, factor, seed: the settings of the replay.
        written_by: the vaefast version that wrote the database (its ``meta``), None if not recorded.
    """

    db: Path
    rows: list[dict[str, Any]]
    confidence: float
    factor: int
    seed: int
    written_by: str | None = None

    @property
    def version_note(self) -> str | None:
        """One line when another vaefast version wrote the database (:func:`vaefast._version.version_note`)."""
        return version_note(self.written_by, str(self.db))

    @property
    def checked(self) -> int:
        """The number of claims checked."""
        return len(self.rows)

    @property
    def confirmed(self) -> int:
        """The number of claims confirmed."""
        return sum(int(r["confirmed"]) for r in self.rows)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The rows of the claims not confirmed."""
        return [r for r in self.rows if not r["confirmed"]]

    @property
    def all_confirmed(self) -> bool:
        """Whether every claim checked was confirmed."""
        return self.confirmed == self.checked

    def summary(self) -> list[dict[str, Any]]:
        """The replay per group.

        Returns:
            One row per (model, r, kind): claims ``checked`` and ``confirmed``, and the confirmed ``fraction``.
        """
        groups: dict[tuple[str, float, str], list[int]] = {}
        for row in self.rows:
            key = (row["model"], row["r"], row["kind"])
            groups.setdefault(key, []).append(int(row["confirmed"]))
        return [
            {"model": m, "r": r, "kind": k, "checked": len(v), "confirmed": sum(v), "fraction": sum(v) / len(v)}
            for (m, r, k), v in sorted(groups.items())
        ]


def verify_sweep(
    db: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module | str | os.PathLike] | None = None,
    factor: int = 4,
    confidence: float = 0.99,
    sample: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> VerifyReport:
    """Replay the evidence of every (or ``sample`` random) results row of ``db`` (module docstring).

    Args:
        db: a results database written by :func:`vaefast.sweep.run_sweep`.
        models: ``{name: nn.Module or run folder}`` overriding the stored sources (needed for models swept from
            memory); the weights must match the sweep's (checked by SHA-256).
        factor: the replay draws ``factor`` × the sweep's ``num_samples`` per claim.
        confidence: confidence of the replay's Clopper–Pearson intervals.
        sample: check this many randomly chosen rows (drawn with ``seed``) instead of all.
        seed: seeds the replay's random stream and the row sample.
        device: where the models run.
        progress: show a progress bar over (model, r) groups.

    Returns:
        A :class:`VerifyReport`; its rows are also stored in the database's ``verifications`` table.
    """
    factor = check_positive_int("factor", factor)
    confidence = check_probability("confidence", confidence)
    seed = check_seed("seed", seed)
    conn = store.connect(db, create=False)
    try:
        rows = _select(store.read_table(conn, "results", blobs=True), sample, seed)
        info = store.model_info(conn)
        points = {p["pos"]: p["x"] for p in store.read_table(conn, "points", blobs=True)}
        meta = store.get_meta(conn)
        spec = json.loads(meta.get("spec", "{}"))
        loaded = load_stored_models(info, sorted({r["model"] for r in rows}), models, device)
        checks = _replay(rows, loaded, info, points, spec, factor, confidence, seed, progress)
        store.write_verifications(conn, [{k: c[k] for k in store.VERIFY_COLUMNS} for c in checks])
    finally:
        conn.close()
    return VerifyReport(Path(db), checks, confidence, factor, seed, meta.get("vaefast_version"))


def _select(rows: list[dict[str, Any]], sample: int | None, seed: int) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: (r["model"], r["r"], r["pos"]))
    if sample is None:
        return rows
    check_positive_int("sample", sample)
    if sample >= len(rows):
        return rows
    picked = set(random.Random(seed).sample(range(len(rows)), sample))
    return [r for i, r in enumerate(rows) if i in picked]


def _replay(rows, models, info, points, spec, factor, confidence, seed, progress) -> list[dict[str, Any]]:
    """Check every claim of ``rows``, grouped by (model, r) so each group is one batched estimate per kind."""
    box = SweepSpec.from_json(json.dumps(spec)).box
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["r"]), []).append(row)
    checks: list[dict[str, Any]] = []
    for (name, r), group in progress_bar(
        groups.items(), desc="verify", unit="group", total=len(groups), enabled=progress
    ):
        model = models[name]
        shape = info[name]["input_shape"]
        for kind in KINDS:
            claims = [row for row in group if _claims(row, kind)]
            if claims:
                checks += _check_group(model, shape, claims, kind, r, points, box, factor, confidence, seed)
    return checks


def _claims(row: Mapping[str, Any], kind: str) -> bool:
    if kind == "delta":
        return row["delta"] is not None or (bool(row["certified"]) and bool(row["bracketed"]))
    return bool(row["certified"])


def _tensor(blob: bytes | None, shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
    arr = store.from_blob(blob, shape)
    t = torch.zeros(tuple(shape)) if arr is None else torch.from_numpy(arr.copy())
    return t if like is None else t.to(like)


def _check_group(model, shape, claims, kind, r, points, box, factor, confidence, seed) -> list[dict[str, Any]]:
    """Exact checks, then one fresh estimate per run of consecutive positions (random numbers keyed by pos)."""
    param = next(iter(model.parameters()), None)
    ref = (
        torch.zeros((), dtype=torch.float32)
        if param is None
        else torch.zeros((), dtype=param.dtype, device=param.device)
    )
    x = torch.stack([_tensor(points[row["pos"]], shape, ref) for row in claims])
    delta = torch.stack([_tensor(row["delta"], shape, ref) for row in claims]) if kind == "delta" else None
    reasons = [_exact_reason(row, x[i], None if delta is None else delta[i], box) for i, row in enumerate(claims)]
    stream = derive_seed(claims[0]["seed"], "verify", seed)
    samples = factor * int(claims[0]["num_samples"])
    est = _estimate(model, x, delta, r, samples, stream, confidence, [row["pos"] for row in claims])
    out = []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for i, row in enumerate(claims):
        low, high = float(est.ci_low[i, 0]), float(est.ci_high[i, 0])
        statistical = low <= 0.5 if kind == "delta" else high > 0.5
        reason = reasons[i]
        if not statistical:
            side = "above" if kind == "delta" else "at or below"
            reason = "; ".join(filter(None, [reason, f"fresh interval [{low:.4f}, {high:.4f}] lies {side} 1/2"]))
        out.append(
            {
                "item_id": row["item_id"], "kind": kind, "model": row["model"], "r": r, "pos": row["pos"],
                "p_hat": float(est.p_hat[i, 0]), "ci_low": low, "ci_high": high, "hits": int(est.hits[i, 0]),
                "num_samples": samples, "seed": stream, "confidence": confidence,
                "confirmed": int(not reason), "reason": reason or None, "checked_at": now,
            }
        )  # fmt: skip
    return out


def _exact_reason(row, x: torch.Tensor, delta: torch.Tensor | None, box) -> str | None:
    """Why a stored δ cannot be the evidence of the row's margin (None when it can)."""
    if delta is None:
        return None
    problems = []
    norm = float(delta.double().flatten().norm())
    upper = row["margin_upper"]
    if upper is None or not math.isclose(norm, float(upper), rel_tol=1e-4, abs_tol=1e-6):
        problems.append(f"||delta|| = {norm:.6g} != margin_upper {upper}")
    if box is not None:
        adv = (x + delta).double()
        tol = 1e-5 * (box[1] - box[0])
        if bool((adv < box[0] - tol).any()) or bool((adv > box[1] + tol).any()):
            problems.append(f"x + delta leaves the box {tuple(box)}")
    hits, n = row["hits_adv"], row["num_samples_adv"]
    if hits is None or not n or row["p_hat_adv"] is None or 2 * hits > n or row["p_hat_adv"] != hits / n:
        problems.append(f"stored p_hat_adv {row['p_hat_adv']} is not a count <= 1/2 ({hits} of {n})")
    return "; ".join(problems) or None


def _estimate(model, x, delta, r, samples, seed, confidence, positions):
    """``estimate_r_robustness`` with the random numbers of row i keyed by ``positions[i]`` (consecutive runs)."""
    parts = []
    for start, length, first in id_runs(torch.tensor(positions)):
        sl = slice(start, start + length)
        d = None if delta is None else delta[sl]
        parts.append(
            estimate_r_robustness(
                model, x[sl], [r], num_samples=samples, delta=d, seed=seed, confidence=confidence, point_offset=first
            )
        )
    return types.SimpleNamespace(
        **{f: torch.cat([getattr(p, f) for p in parts]) for f in ("p_hat", "ci_low", "ci_high", "hits")}
    )
