"""The one source of reproducible randomness in vaefast.

Everything that must come out the same on a re-run, whatever the batch split, chunking, device or number of
processes, draws its numbers here:

- :func:`derive_seed`: a 63-bit seed from a base seed and an identity (``SHA-256`` of its ``repr``), e.g. the
  seed of one (model, r) item of a sweep, or of one named *stream* of an analysis.
- :func:`normals`: standard normals ``eps[b, s, j]`` keyed by ``(seed, stream, point id, sample index,
  coordinate)``: Philox4x32-10 with the Box–Muller transform of the compiled ``reparam_sample`` op (bit-identical
  on CPU, CUDA and the pure-PyTorch reference). A point's numbers depend only on its *global* id, never on the
  batch it is in, so every function that keys its noise by point id is batch-invariant.
- :func:`id_runs`: the maximal runs of consecutive ids in a batch (one Philox call per run).

- :func:`generator`: a ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``, for the few consumers whose
  numbers are order-dependent by nature (training's shuffling and noise, a model's initialisation, data splits).

Streams of :func:`normals` in use (the Monte-Carlo estimators draw the reparameterisation noise on ``seed`` itself):
``"attack-noise"`` (the max-damage attack's common random numbers), ``"attack-start"`` (random starts of every
restart), ``"elbo-noise"`` (the output attack's ELBO target), ``"hutchinson"`` (Jacobian probes), ``"lanczos"``
(the random starts of the randomized Jacobian norms' Lanczos runs).

Identities of :func:`derive_seed` in use: ``("vae", "init")`` and ``("vae", "elbo")`` (models), ``("training",
purpose)`` for purpose in shuffle / noise / evaluate / iwae, ``("data", "split")`` and ``("data", "shapes")``,
``("mc" | "curve", model, r)`` and ``("auto-radii", model)`` (sweeps), ``("verify", seed)`` (the replay of a
sweep's evidence), ``("stream", name)`` (the streams above).
"""

from __future__ import annotations

import hashlib

import torch

from vaefast._checks import check_positive_int, check_seed

__all__ = ["derive_seed", "generator", "id_runs", "normals"]


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed from ``base`` and an identity.

    Args:
        base: the user's seed.
        *parts: the identity (strings, numbers); floats enter through ``repr`` (an exact round trip), so the seed
            depends only on the identity.

    Returns:
        ``int.from_bytes(sha256(repr((base, *parts)))[:8], "little") & (2**63 - 1)``.
    """
    digest = hashlib.sha256(repr((int(base), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def id_runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive integers in ``ids``.

    Args:
        ids: a 1-D integer tensor (e.g. the global point ids of a batch).

    Returns:
        ``(position, length, first id)`` per run, in order.
    """
    values = ids.tolist()
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, i - start, values[start]))
            start = i
    return runs


def normals(
    point_ids: torch.Tensor,
    num: int,
    dim: int,
    seed: int,
    stream: str,
    *,
    sample_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normals ``eps[b, s, j]`` for the points ``point_ids``, keyed by identity, not by position.

    ``eps[b, s, j] = Philox(derive_seed(seed, stream); point_ids[b], sample_offset + s, j)`` through Box–Muller
    (the ``reparam_sample`` op with ``mu = 0``, ``logvar = 0``): float32 numbers, cast to ``dtype``.

    Args:
        point_ids: ``[B]`` non-negative global point ids (any order, repeats allowed; one call of the op).
        num: samples per point.
        dim: coordinates per sample.
        seed: the base seed.
        stream: the name of the stream (distinct names give independent numbers).
        sample_offset: index of the first sample (draw samples in chunks with the same numbers).
        dtype, device: of the result.

    Returns:
        ``[B, num, dim]``.
    """
    from vaefast import ops

    seed = check_seed("seed", seed)
    num = check_positive_int("num", num)
    dim = check_positive_int("dim", dim)
    key = derive_seed(seed, "stream", stream)
    ids = torch.as_tensor(point_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        return torch.empty(0, num, dim, dtype=dtype, device=device)
    zeros = torch.zeros(ids.shape[0], dim, dtype=torch.float32, device=device)
    eps = ops.reparam_sample(zeros, zeros, num, seed=key, sample_offset=sample_offset, point_ids=ids)
    return eps.to(dtype)


def generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *parts)``.

    Args:
        seed: the user's seed.
        *parts: the purpose, e.g. ``("training", "shuffle")``: different purposes never share numbers.
        device: the generator's device.

    Returns:
        The seeded generator.
    """
    return torch.Generator(device=device).manual_seed(derive_seed(check_seed("seed", seed), *parts))
