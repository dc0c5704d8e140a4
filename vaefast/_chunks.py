"""Chunking of batched work: the one place that splits points (and samples) into bounded batches.

Decoder batches, evaluation batches and rendering batches all go through these helpers, so a memory bound is
computed the same way everywhere: a batch of ``p`` points with ``s`` samples of ``e`` numbers each holds
``p * s * e`` numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["chunk_sizes", "index_batches", "points_per_batch", "spans"]


def spans(total: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive half-open ranges covering ``0 .. total - 1``.

    Args:
        total: the number of items.
        size: the largest range (``>= 1``).

    Yields:
        ``(start, stop)`` with ``stop - start = min(size, total - start)``, for ``start = 0, size, 2 size, ...``.
    """
    for start in range(0, total, size):
        yield start, min(start + size, total)


def index_batches(total: int, size: int, order: torch.Tensor | None = None) -> Iterator[slice | torch.Tensor]:
    """Indices of consecutive batches of at most ``size`` items.

    Args:
        total: the number of items.
        size: the batch size.
        order: an optional permutation ``[total]`` (e.g. a shuffle): batches are its consecutive pieces.

    Yields:
        ``slice(start, stop)`` per batch, or ``order[start:stop]`` when ``order`` is given.
    """
    for start, stop in spans(total, size):
        yield slice(start, stop) if order is None else order[start:stop]


def points_per_batch(samples_per_point: int, numbers_per_sample: int, max_numbers: int) -> int:
    """How many points fit in one batch when each carries all its samples.

    Args:
        samples_per_point: ``s``, the samples every point brings.
        numbers_per_sample: ``e``, the numbers per sample (e.g. the decoder's output size).
        max_numbers: the bound on ``p * s * e``.

    Returns:
        ``max(1, floor(max_numbers / (s * e)))``: at least one point, even past the bound.
    """
    return max(1, max_numbers // (samples_per_point * numbers_per_sample))


def chunk_sizes(num_points: int, num_samples: int, numbers_per_sample: int, max_numbers: int) -> tuple[int, int]:
    """Point and sample chunk sizes of a batch of at most ``max_numbers`` numbers.

    Samples are chunked first (a point's samples fill a batch before a second point joins), then as many points as
    fit: ``sample_chunk = clamp(floor(max_numbers / e), 1, S)``,
    ``point_chunk = clamp(floor(max_numbers / (sample_chunk * e)), 1, B)``.

    Args:
        num_points: ``B``, the points to process.
        num_samples: ``S``, the samples per point.
        numbers_per_sample: ``e``, the numbers per sample.
        max_numbers: the bound on ``point_chunk * sample_chunk * e``; below ``e`` a batch still holds one sample of
            one point.

    Returns:
        ``(point_chunk, sample_chunk)``.
    """
    sample_chunk = max(1, min(num_samples, max_numbers // numbers_per_sample))
    point_chunk = min(num_points, points_per_batch(sample_chunk, numbers_per_sample, max_numbers))
    return max(1, point_chunk), sample_chunk
