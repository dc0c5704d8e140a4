"""Procedural dSprites-style shapes: square, ellipse, heart x scale x rotation x position, 64x64 binary.

Every image is a deterministic function of its factors (no randomness anywhere): pixel centres ``p`` in
``[0, 1]^2``, object centre ``c = 0.2 + 0.6 (pos_x, pos_y)``, radius ``R = 0.15 scale``, local coordinates
``(u, v) = Rot(-rotation) (p - c) / R``; a pixel is on iff ``(u, v)`` lies inside the unit shape:
square ``max(|u|, |v|) <= 0.8``, ellipse ``u^2 + (v / 0.5)^2 <= 1``,
heart ``(a^2 + b^2 - 1)^3 - a^2 b^3 <= 0`` with ``a = 1.1 u``, ``b = 0.1 - 1.1 v`` (upright, y down).
"""

from __future__ import annotations

import math

import torch

from vaefast import rng
from vaefast._checks import check_positive_int, check_probability
from vaefast._chunks import spans
from vaefast.data.base import DataSplit

SHAPE_NAMES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "rotation", "pos_x", "pos_y")
IMAGE_SIZE = 64
SPLIT_SEED = 0


def shape_factors(num_scales: int = 3, num_rotations: int = 6, num_positions: int = 6) -> torch.Tensor:
    """The full factor grid.

    Args:
        num_scales: scales evenly spaced in [0.5, 1] (1: scale 1).
        num_rotations: rotations ``2 pi k / num_rotations``.
        num_positions: positions evenly spaced in [0, 1] per axis (1: the centre 0.5).

    Returns:
        ``[3 * num_scales * num_rotations * num_positions^2, 5]`` float32 rows (shape index, scale, rotation,
        pos_x, pos_y), shapes outermost.
    """
    check_positive_int("num_scales", num_scales)
    check_positive_int("num_rotations", num_rotations)
    check_positive_int("num_positions", num_positions)
    shapes = torch.arange(len(SHAPE_NAMES), dtype=torch.float64)
    f64 = torch.float64
    scales = torch.linspace(0.5, 1.0, num_scales, dtype=f64) if num_scales > 1 else torch.ones(1, dtype=f64)
    rotations = torch.arange(num_rotations, dtype=f64) * (2 * math.pi / num_rotations)
    positions = (
        torch.linspace(0.0, 1.0, num_positions, dtype=f64) if num_positions > 1 else torch.full((1,), 0.5, dtype=f64)
    )
    grid = torch.cartesian_prod(shapes, scales, rotations, positions, positions)
    return grid.float()


def render_shapes(factors: torch.Tensor, size: int = IMAGE_SIZE, chunk: int = 512) -> torch.Tensor:
    """Render factor rows as binary images (the geometry of the module docstring).

    Args:
        factors: ``[N, 5]`` rows (shape index, scale, rotation, pos_x, pos_y).
        size: the image side (``>= 4``).
        chunk: images rendered per batch.

    Returns:
        float32 0/1 images ``[N, 1, size, size]``.
    """
    if not isinstance(factors, torch.Tensor) or factors.dim() != 2 or factors.shape[1] != 5:
        raise ValueError(f"factors must be a tensor [N, 5], got {getattr(factors, 'shape', type(factors).__name__)}")
    check_positive_int("size", size, minimum=4)
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    out = torch.empty(factors.shape[0], 1, size, size)
    for start, stop in spans(factors.shape[0], chunk):
        f = factors[start:stop].float()
        shape, scale, rot, pos_x, pos_y = (f[:, i, None, None] for i in range(5))
        radius = 0.15 * scale
        dx = (px - (0.2 + 0.6 * pos_x)) / radius
        dy = (py - (0.2 + 0.6 * pos_y)) / radius
        cos, sin = torch.cos(rot), torch.sin(rot)
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        square = torch.maximum(u.abs(), v.abs()) <= 0.8
        ellipse = u.pow(2) + (v / 0.5).pow(2) <= 1.0
        a, b = 1.1 * u, 0.1 - 1.1 * v
        heart = (a.pow(2) + b.pow(2) - 1).pow(3) - a.pow(2) * b.pow(3) <= 0
        img = torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))
        out[start:stop, 0] = img.float()
    return out


def load_shapes(
    split: str = "train",
    num_scales: int = 3,
    num_rotations: int = 6,
    num_positions: int = 6,
    test_fraction: float = 0.1,
) -> DataSplit:
    """The shapes grid split deterministically into train and test; ``factors`` are returned with the images.

    Default grid: 3 shapes x 3 scales x 6 rotations x 6 x 6 positions = 1,944 images (about a second). The test
    rows are the first ``max(1, round(test_fraction * N))`` of a permutation from a generator seeded with
    ``rng.derive_seed(SPLIT_SEED, "data", "shapes")``.

    Args:
        split: ``"train"`` or ``"test"``.
        num_scales, num_rotations, num_positions: the grid (:func:`shape_factors`).
        test_fraction: the test share, in (0, 1).

    Returns:
        A :class:`DataSplit` with labels (the shape index) and the factors.
    """
    check_probability("test_fraction", test_fraction)
    factors = shape_factors(num_scales, num_rotations, num_positions)
    n = factors.shape[0]
    perm = torch.randperm(n, generator=rng.generator(SPLIT_SEED, "data", "shapes"))
    k = max(1, round(test_fraction * n))
    idx = (perm[:k] if split == "test" else perm[k:]).sort().values
    f = factors[idx]
    return DataSplit(render_shapes(f), f[:, 0].long(), f, "shapes", FACTOR_NAMES)
