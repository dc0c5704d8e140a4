"""Re-check a sweep database (``vaefast verify``): every deterministic column re-derived, every stored claim replayed
with independent random numbers.

**Re-derived** (:mod:`vaefast.rederive`): the identity and completeness of the sweep against its specification, the
clean estimate's columns and decision from its counts, the bounds from their components, the margins' order and the
evidence's norm, box, counts and likelihoods, on every row; and, on the rows checked, the encoder's geometry, the
clean counts and the evidence counts recounted from the model on the sweep's own random numbers, the sound
certificates, and (``recompute``) the margin search run again. Each disagreement
is a :class:`~vaefast.rederive.Discrepancy` naming its row: any tampered column is caught.

**Replayed**, per checked row, up to two claims:

- ``"delta"`` (rows with evidence: decided robust at δ = 0 and a decided break): the stored perturbation δ breaks
  r-robustness, i.e. ``p_r(x, δ) <= 1/2``. A fresh Monte-Carlo estimate of ``p_r(x, δ)`` with ``factor`` × the
  sweep's sample count, on a Philox stream keyed by ``H(row seed, "verify", seed)`` (independent of every stream
  the sweep used), and its two-sided Clopper–Pearson interval at ``confidence``: the claim is **confirmed** unless
  the interval lies entirely above 1/2 (``ci_low > 1/2``).
- ``"clean"`` (certified rows, decided robust at the sweep's confidence): the clean point is r-robust,
  ``p_r(x, 0) > 1/2``; confirmed unless the fresh interval lies entirely at or below 1/2 (``ci_high <= 1/2``).

The intervals are family-wise (Bonferroni): with N claims replayed, each interval is at ``1 - (1 - confidence) / N``,
so the chance that any true claim is refuted is at most ``(1 - confidence) / 2`` however many claims a sweep makes
(``familywise=False``: each interval at ``confidence``, a per-claim rate). A δ that does not break the point fails
the statistical check with a power that grows with ``factor``.

The database is read read-only; the replayed claims are then stored in its ``verifications`` table when it can be
written (a read-only file is checked all the same, and the report says the claims were not stored).
"""

from __future__ import annotations

import dataclasses
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
from vaefast.rederive import (
    Discrepancy,
    StoredSweep,
    model_discrepancies,
    search_discrepancies,
    stored_discrepancies,
)
from vaefast.rng import derive_seed, id_runs
from vaefast.robustness import estimate_r_robustness
from vaefast.sweep.inputs import load_stored_models, on_model
from vaefast.sweep.spec import SweepSpec

__all__ = ["VerifyReport", "verify_sweep"]

KINDS = ("delta", "clean")


@dataclasses.dataclass
class VerifyReport:
    """The outcome of :func:`verify_sweep`.

    Attributes:
        db: the database checked.
        rows: one ``verifications`` row per checked claim (also written to the database when it can be written).
        confidence, factor, seed: the settings of the replay.
        familywise: whether ``confidence`` holds for all claims together (each interval at ``claim_confidence``).
        written_by: the vaefast version that wrote the database (its ``meta``), None if not recorded.
        discrepancies: every stored value its re-derivation contradicts (:mod:`vaefast.rederive`).
        stored: whether ``rows`` were written to the database's ``verifications`` table (False: read-only).
    """

    db: Path
    rows: list[dict[str, Any]]
    confidence: float
    factor: int
    seed: int
    written_by: str | None = None
    discrepancies: list[Discrepancy] = dataclasses.field(default_factory=list)
    stored: bool = True
    familywise: bool = True

    @property
    def claim_confidence(self) -> float:
        """The confidence of each claim's interval: ``1 - (1 - confidence) / N`` (family-wise) or ``confidence``."""
        n = max(self.checked, 1) if self.familywise else 1
        return 1.0 - (1.0 - self.confidence) / n

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

    @property
    def passed(self) -> bool:
        """Whether every claim was confirmed and every re-derived column agrees."""
        return self.all_confirmed and not self.discrepancies

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
    recompute: bool = True,
    familywise: bool = True,
) -> VerifyReport:
    """Replay the evidence of every (or ``sample`` random) results row of ``db`` (module docstring).

    Args:
        db: a results database written by :func:`vaefast.sweep.run_sweep`.
        models: ``{name: nn.Module or run folder}`` overriding the stored sources (needed for models swept from
            memory); the weights must match the sweep's (checked by SHA-256).
        factor: the replay draws ``factor`` × the sweep's ``num_samples`` per claim.
        confidence: confidence of the replay's Clopper–Pearson intervals, for all claims together (``familywise``).
        familywise: Bonferroni over the claims (each interval at ``1 - (1 - confidence) / N``); False: each at
            ``confidence``.
        sample: check this many randomly chosen rows (drawn with ``seed``) instead of all.
        seed: seeds the replay's random stream and the row sample.
        device: where the models run.
        progress: show a progress bar over (model, r) groups.
        recompute: run the margin search of every unit holding a checked row again and compare its margins and
            evidence (:func:`vaefast.rederive.search_discrepancies`; about the margin stage's share of the sweep's
            time for the rows checked).

    Returns:
        A :class:`VerifyReport`: the replayed claims (also stored in the database's ``verifications`` table when it
        can be written) and every discrepancy of a re-derived column (on every row; the model's re-derivations on
        the rows checked).
    """
    factor = check_positive_int("factor", factor)
    confidence = check_probability("confidence", confidence)
    seed = check_seed("seed", seed)
    if sample is not None:
        check_positive_int("sample", sample)
    sweep, info = _read(db)
    rows = _select(sweep.results, sample, seed)
    loaded = load_stored_models(info, sorted({r["model"] for r in rows} & set(info)), models, device)
    found = stored_discrepancies(sweep)
    for name, model in loaded.items():
        mine = [r for r in rows if r["model"] == name]
        found += model_discrepancies(model, name, mine, sweep)
        if recompute:
            found += search_discrepancies(model, name, mine, sweep)
    replayable = [r for r in rows if _replayable(r, sweep)]
    claims = sum(_claims(r, kind) for r in replayable for kind in KINDS) if familywise else 1
    checks = _replay(replayable, loaded, sweep, factor, 1.0 - (1.0 - confidence) / max(claims, 1), seed, progress)
    stored = _store(db, checks)
    written_by = sweep.meta.get("vaefast_version")
    return VerifyReport(Path(db), checks, confidence, factor, seed, written_by, found, stored, familywise)


def _read(db: str | os.PathLike) -> tuple[StoredSweep, dict[str, dict[str, Any]]]:
    """The tables of ``db``, read read-only, and its ``models`` rows by name."""
    conn = store.connect(db, readonly=True)
    try:
        meta = store.get_meta(conn)
        info = store.model_info(conn)
        order = [tuple(r) for r in conn.execute("SELECT name, weights_sha256 FROM models ORDER BY rowid")]
        sweep = StoredSweep(
            meta=meta,
            spec=_spec(meta, db),
            models=order,
            points={p["pos"]: p for p in store.read_table(conn, "points", blobs=True)},
            units=store.read_table(conn, "units"),
            results=store.read_table(conn, "results", blobs=True),
            curves=store.read_table(conn, "curves"),
            input_shape={name: row["input_shape"] for name, row in info.items()},
        )
    finally:
        conn.close()
    return sweep, info


def _spec(meta: Mapping[str, str], db: str | os.PathLike) -> SweepSpec:
    """The sweep's specification from ``meta`` (a database without one holds no sweep)."""
    if "spec" not in meta:
        raise ValueError(f"{str(db)!r} holds no sweep yet (no specification in its meta table)")
    try:
        return SweepSpec.from_json(meta["spec"])
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{str(db)!r}: its stored sweep specification is unreadable ({exc})") from None


def _store(db: str | os.PathLike, checks: list[dict[str, Any]]) -> bool:
    """Write the replayed claims to ``verifications``; False when the database cannot be written (read-only)."""
    try:
        conn = store.connect(db, create=False)
    except store.DatabaseError:
        return False
    try:
        store.write_verifications(conn, [{k: c[k] for k in store.VERIFY_COLUMNS} for c in checks])
    except store.DatabaseError:
        return False
    finally:
        store.close_writer(conn)
    return True


def _replayable(row: Mapping[str, Any], sweep: StoredSweep) -> bool:
    """Whether a row's claims can be replayed: its model, point and δ are well formed (else a discrepancy says so)."""
    shape = sweep.input_shape.get(row["model"])
    if shape is None or row["pos"] not in sweep.points or row["r"] is None or not row["r"] > 0:
        return False
    size = 4 * math.prod(shape)
    return len(sweep.points[row["pos"]]["x"]) == size and (row["delta"] is None or len(row["delta"]) == size)


def _select(rows: list[dict[str, Any]], sample: int | None, seed: int) -> list[dict[str, Any]]:
    rows = sorted(rows, key=lambda r: (str(r["model"]), float(r["r"] or 0.0), int(r["pos"] or 0)))
    if sample is None or sample >= len(rows):
        return rows
    picked = set(random.Random(seed).sample(range(len(rows)), sample))
    return [r for i, r in enumerate(rows) if i in picked]


def _replay(rows, models, sweep: StoredSweep, factor, confidence, seed, progress) -> list[dict[str, Any]]:
    """Check every claim of ``rows``, grouped by (model, r) so each group is one batched estimate per kind."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["r"]), []).append(row)
    checks: list[dict[str, Any]] = []
    samples = factor * sweep.spec.num_samples
    for (name, r), group in progress_bar(
        groups.items(), desc="verify", unit="group", total=len(groups), enabled=progress
    ):
        for kind in KINDS:
            claims = [row for row in group if _claims(row, kind)]
            if claims:
                checks += _check_group(models[name], sweep, claims, kind, r, samples, confidence, seed)
    return checks


def _claims(row: Mapping[str, Any], kind: str) -> bool:
    if kind == "delta":
        return row["delta"] is not None or (bool(row["certified"]) and bool(row["bracketed"]))
    return bool(row["certified"])


def _tensor(blob: bytes | None, shape: Sequence[int]) -> torch.Tensor:
    arr = store.from_blob(blob, shape)
    return torch.zeros(tuple(shape)) if arr is None else torch.from_numpy(arr.copy())


def _check_group(model, sweep: StoredSweep, claims, kind, r, samples, confidence, seed) -> list[dict[str, Any]]:
    """One fresh estimate per run of consecutive positions (random numbers keyed by pos) for the group's claims."""
    name = claims[0]["model"]
    shape = sweep.input_shape[name]
    x = on_model(model, torch.stack([sweep.point(row["pos"], name) for row in claims]))
    delta = on_model(model, torch.stack([_tensor(row["delta"], shape) for row in claims])) if kind == "delta" else None
    stream = derive_seed(claims[0]["seed"], "verify", seed)
    est = _estimate(model, x, delta, r, samples, stream, confidence, [row["pos"] for row in claims])
    out = []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for i, row in enumerate(claims):
        low, high = float(est.ci_low[i, 0]), float(est.ci_high[i, 0])
        confirmed = low <= 0.5 if kind == "delta" else high > 0.5
        side = "above" if kind == "delta" else "at or below"
        out.append(
            {
                "item_id": row["item_id"], "kind": kind, "model": row["model"], "r": r, "pos": row["pos"],
                "p_hat": float(est.p_hat[i, 0]), "ci_low": low, "ci_high": high, "hits": int(est.hits[i, 0]),
                "num_samples": samples, "seed": stream, "confidence": confidence, "confirmed": int(confirmed),
                "reason": None if confirmed else f"fresh interval [{low:.4f}, {high:.4f}] lies {side} 1/2",
                "checked_at": now,
            }
        )  # fmt: skip
    return out


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
