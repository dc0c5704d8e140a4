"""Sampling and counting on validated tensors: reparameterised samples of any rows (keyed by their global point ids),
decoded in chunks derived from the memory budget, and r-sphere hits for many radii at once.

``z[n, s] = mu[n] + sigma[n] * eps(seed; id[n], start + s)`` (:func:`vaefast.ops.reparam_sample`), so a row's samples
depend only on its id and sample indices: results are independent of the chunking, of the batch a row is in and of
repeated rows. A decoder call decodes at most ``rows_per_call`` samples: the fewer of what ``max_memory`` allows (the
bytes of one decoded sample measured once per model, :func:`vaefast._memory.activation_bytes`) and a speed cap of
``2**21`` output numbers on a CPU (measured: the decoder's intermediates stay in cache) or ``2**24`` on a GPU.

The smallest robust radius ``r* = d_(k)``, ``k = floor(S/2) + 1``, is an exact order statistic of a point's S
distances. They are kept only while they fit in ``DISTANCE_BYTES``; beyond that (very large S) a point is done in
passes over the same samples (they are reproducible): the first counts hits at probe radii taken from the quantiles
of its first chunk, and the next ones keep only the distances inside the probe bracket that holds the k-th, so memory
stays bounded whatever S.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from vaefast import ops
from vaefast._chunks import spans
from vaefast._memory import activation_bytes, check_max_memory, rows_that_fit
from vaefast.core.encoding import Encoding

__all__ = ["DISTANCE_BYTES", "SPEED_ELEMENTS", "Sampler", "decoder_precision"]

SPEED_ELEMENTS = {"cpu": 2**21, "cuda": 2**24}  # decoder outputs per call (benchmarks/README.md: estimator)
DISTANCE_BYTES = 16 * 2**20  # the most bytes of stored distances (r*) at a time
PROBES = 255  # probe radii per pass of the bounded-memory order statistic


@contextlib.contextmanager
def decoder_precision(precision: str | None, device: torch.device) -> Iterator[None]:
    """The decoder's reduced precision: ``"bf16"`` runs it under ``torch.autocast(device, torch.bfloat16)``,
    ``"tf32"`` lets float32 matmuls use TF32 (restored afterwards), None changes nothing."""
    if precision is None:
        yield
    elif precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class Sampler:
    """Draws, decodes and counts samples of an encoding's rows for one model.

    Args:
        model: a protocol model (in eval mode: the caller's job).
        device: where the model runs.
        max_memory: the working-set budget in bytes (None: the device's default).
        precision: the samples' decoder precision (None, ``"bf16"``, ``"tf32"``).
    """

    def __init__(self, model: Any, device: torch.device, max_memory: int | None = None, precision: str | None = None):
        self.model = model
        self.device = torch.device(device)
        self.budget = check_max_memory(max_memory, self.device)
        self.precision = precision
        self._row_bytes: int | None = None
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)

    def rows_per_call(self, mu: torch.Tensor, out_dim: int) -> int:
        """Decoded samples per decoder call (module docstring).

        Args:
            mu: a latent row (its shape and dtype probe the decoder once).
            out_dim: numbers per decoded sample.

        Returns:
            ``min(max_memory / bytes per sample, speed cap / out_dim)``, at least 1.

        Raises:
            MemoryBudgetError: not even one sample fits in ``max_memory``.
        """
        if self._row_bytes is None:
            probe = torch.zeros(1, mu.shape[1], dtype=mu.dtype, device=mu.device)
            with decoder_precision(self.precision, self.device):
                self._row_bytes = activation_bytes(self.model.decode, probe)
        fit = rows_that_fit(self._row_bytes, self.budget, "decoding one sample")
        return max(1, min(fit, SPEED_ELEMENTS.get(self.device.type, 2**24) // max(1, out_dim)))

    def check_finite(self) -> None:
        """Raise if any decoded sample so far had a NaN or Inf distance (one host synchronisation).

        Raises:
            ValueError: the decoder returned NaN or Inf.
        """
        if not bool(self._finite):
            raise ValueError("the model's decoder returned NaN or Inf for some samples (check its weights)")

    def _decode_hits(
        self, enc: Encoding, ids: torch.Tensor, radii: torch.Tensor, seed: int, start: int, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hits ``[n, K]`` and distances ``[n, count]`` of samples ``start .. start + count - 1`` of ``n`` rows, in
        one decoder call (the caller sizes it)."""
        n, d = enc.mu.shape
        z = ops.reparam_sample_unchecked(enc.mu, enc.logvar, count, seed, 0, start, ids)
        with torch.no_grad(), decoder_precision(self.precision, self.device):
            y = self.model.decode(z.reshape(n * count, d))
        y = y.reshape(n, count, -1).to(enc.center.dtype)  # distances in the model's own precision
        hits, dist = ops.sphere_hits_unchecked(y, enc.center, radii)
        self._finite &= torch.isfinite(dist).all()
        return hits, dist

    def hits(
        self, enc: Encoding, ids: torch.Tensor, radii: torch.Tensor, seed: int, start: int, count: int
    ) -> torch.Tensor:
        """``hits[n, k] = #{s in [start, start + count) : ||g(z_ns) - center_n|| <= radii[k]}``.

        Args:
            enc: the rows' encoding (on the model's device).
            ids: ``[n]`` int64 global point ids on the same device.
            radii: ``[K]`` float64 on the same device.
            seed: the Monte-Carlo stream.
            start, count: the sample indices.

        Returns:
            ``[n, K]`` int64 on the device.
        """
        n = len(enc)
        hits = torch.zeros(n, radii.shape[0], dtype=torch.int64, device=enc.mu.device)
        per_call = self.rows_per_call(enc.mu, enc.center.shape[1])
        sample_chunk = max(1, min(count, per_call))
        point_chunk = max(1, per_call // sample_chunk)
        for p0, p1 in spans(n, point_chunk):
            part = enc.take(torch.arange(p0, p1, device=enc.mu.device))
            for s0, s1 in spans(count, sample_chunk):
                hits[p0:p1] += self._decode_hits(part, ids[p0:p1], radii, seed, start + s0, s1 - s0)[0]
        return hits

    def hits_and_kth(
        self, enc: Encoding, ids: torch.Tensor, radii: torch.Tensor, seed: int, count: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hits of samples ``0 .. count - 1`` and the k-th smallest of each row's ``count`` distances.

        Args:
            enc, ids, radii, seed: as in :meth:`hits`.
            count: the samples per row.
            k: the order statistic (1-based).

        Returns:
            ``(hits [n, K] on the device, kth [n] float64 on the CPU)``.
        """
        n = len(enc)
        dev = enc.mu.device
        per_call = self.rows_per_call(enc.mu, enc.center.shape[1])
        cap = min(self.budget // 8, DISTANCE_BYTES) // 4  # distances (float32) kept at a time
        hits = torch.zeros(n, radii.shape[0], dtype=torch.int64, device=dev)
        kth = torch.empty(n, dtype=torch.float64)
        if count > cap:  # one row's distances do not fit: passes over its samples
            for i in range(n):
                row = torch.arange(i, i + 1, device=dev)
                h, kth[i] = self._kth_in_passes(enc.take(row), ids[row], radii, seed, count, k, min(per_call, cap))
                hits[i] = h
            return hits, kth
        sample_chunk = max(1, min(count, per_call))
        point_chunk = max(1, min(cap // count, per_call // sample_chunk))
        for p0, p1 in spans(n, point_chunk):
            part = enc.take(torch.arange(p0, p1, device=dev))
            dists = []
            for s0, s1 in spans(count, sample_chunk):
                h, dist = self._decode_hits(part, ids[p0:p1], radii, seed, s0, s1 - s0)
                hits[p0:p1] += h
                dists.append(dist)
            kth[p0:p1] = torch.cat(dists, 1).kthvalue(k, dim=1).values.to(torch.float64).cpu()
        return hits, kth

    def _kth_in_passes(
        self, enc: Encoding, ids: torch.Tensor, radii: torch.Tensor, seed: int, count: int, k: int, chunk: int
    ) -> tuple[torch.Tensor, float]:
        """One row's hits ``[K]`` and k-th distance in passes over its samples, at most ``chunk`` distances kept.

        Invariant: ``#{d <= low} = below < k <= #{d <= high}``. Each pass counts the distances at or below
        ``PROBES`` probe radii inside ``(low, high]`` (the quantiles of the first chunk in the first pass, evenly
        spaced after) and keeps those inside the bracket while they fit; when they all fit, the k-th is read off,
        else the bracket shrinks to the two probes around the k-th.
        """
        low, high, below = -math.inf, math.inf, 0
        first = self._decode_hits(enc, ids, radii, seed, 0, min(chunk, count))[1][0].to(torch.float64)
        probes = torch.quantile(first, torch.linspace(0, 1, PROBES + 2, dtype=torch.float64, device=first.device))
        probes = probes[1:-1]
        hits = torch.zeros(radii.shape[0], dtype=torch.int64, device=first.device)
        for pass_ in itertools.count():
            counts = torch.zeros(probes.shape[0], dtype=torch.int64, device=first.device)
            kept, size, seen_max = [], 0, 0.0
            for s0, s1 in spans(count, chunk):
                h, dist = self._decode_hits(enc, ids, radii, seed, s0, s1 - s0)
                if pass_ == 0:
                    hits += h[0]
                d = dist[0].to(torch.float64)
                seen_max = max(seen_max, float(d.max()))
                counts += (d.unsqueeze(1) <= probes.unsqueeze(0)).sum(0)
                inside = d[(d > low) & (d <= high)]
                size += inside.numel()
                if size <= chunk:
                    kept.append(inside)
            if size <= chunk:
                return hits, float(torch.sort(torch.cat(kept)).values[k - below - 1])
            c = counts.cpu()
            j = int(torch.searchsorted(c, torch.tensor([k]))[0])  # the first probe with at least k at or below it
            if j > 0:
                low, below = float(probes[j - 1]), int(c[j - 1])
            high = float(probes[j]) if j < probes.shape[0] else min(high, seen_max)
            if math.nextafter(max(low, 0.0), math.inf) >= high:  # no float strictly between: the k-th is high
                return hits, high
            probes = torch.linspace(max(low, 0.0), high, PROBES + 2, dtype=torch.float64, device=first.device)[1:-1]
        raise AssertionError("unreachable")
