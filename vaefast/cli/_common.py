"""Pieces shared by several subcommands: model + points and CSV output (``estimate``, ``margin``), the sweep
options and their mapping onto :func:`vaefast.sweep.run_sweep` (``sweep``, ``demo``), ``--model NAME=SOURCE``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from vaefast.core.options import DEFAULT_CONFIDENCE, DEFAULT_NUM_SAMPLES, MarginOptions


def add_model_and_points_options(p: argparse.ArgumentParser) -> None:
    """Add ``RUN`` plus the dataset / point-range / device options.

    Args:
        p: the subcommand's parser.
    """
    p.add_argument(
        "run",
        help="the model: a folder written by 'vaefast train' (or vaefast.models.save), diffusers:PATH (a local "
        "AutoencoderKL folder) or module:function (a Python function returning the model)",
    )
    p.add_argument("--data", default="digits", help="dataset name for vaefast.data.load (default: digits)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--root", default=None, help="dataset folder for file-based datasets")
    p.add_argument("--points", type=int, default=100, help="N points of the split from --start (default 100)")
    p.add_argument("--start", type=int, default=0, help="index of the first point (RNG key of point i is its index)")
    p.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when a GPU is visible, else cpu)"
    )


def load_model_and_points(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    """The model of ``args.run`` (eval mode), points ``start .. start + points`` of the data split and its data box.

    Args:
        args: parsed options of :func:`add_model_and_points_options`.

    Returns:
        ``(model, x, box)``: model and points on the ``--device`` (``auto``: cuda when a GPU is visible, else cpu)
        and the split's :class:`~vaefast.core.box.Box`.

    Raises:
        ValueError: a bad ``--device`` (e.g. cuda without a GPU), ``--points`` < 1, or a point range past the end
            of the split (naming the number of points available).
    """
    from vaefast import data, models
    from vaefast._checks import check_device, check_positive_int

    check_positive_int("--points", args.points)
    check_positive_int("--start", args.start, minimum=0)
    device = check_device("--device", args.device)
    model = models.load_source(args.run, map_location=device).eval()
    split = data.load(args.data, split=args.split, root=args.root)
    n_total = split.x.shape[0]
    where = f"{args.data}/{args.split}"
    if args.start >= n_total:
        raise ValueError(f"--start {args.start} is past the end of {where} ({n_total} points)")
    available = n_total - args.start
    if args.points > available:
        raise ValueError(
            f"--points {args.points} is more than {where} holds from --start {args.start}: {available} available"
        )
    return model, split.x[args.start : args.start + args.points].to(device), split.box


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One CSV row per dict (columns from the first row); creates the parent folder.

    Args:
        rows: the rows (at least one).
        path: the CSV file to write.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")


def model_arg(text: str) -> tuple[str, str]:
    """``--model NAME=SOURCE`` (or ``SOURCE`` alone, named by its folder) as ``(name, source)``; a source is a run
    folder, ``diffusers:PATH`` or ``module:function`` (:func:`vaefast.models.load_source`).

    Args:
        text: the option's value.

    Returns:
        The name and the source.
    """
    name, sep, path = text.partition("=")
    if not sep:
        path = name
        name = os.path.basename(os.path.normpath(name.removeprefix("diffusers:")))
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--model expects NAME=SOURCE or SOURCE, got {text!r}")
    return name, path


def add_sweep_options(
    p: argparse.ArgumentParser,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    batch_size: int = 16,
    margin: MarginOptions | None = None,
) -> None:
    """The options shared by ``sweep`` and ``demo``: what to compute per point, with the command's own defaults
    (those of :class:`vaefast.sweep.SweepSpec` and :class:`~vaefast.core.options.MarginOptions` unless given).

    Args:
        p: the subcommand's parser.
        num_samples, confidence, seed, batch_size: the defaults shown in the help.
        margin: the margin search's defaults (``--tol``, ``--max-radius``, ``--attack-steps`` start from it).
    """
    margin = margin or MarginOptions()
    p.add_argument(
        "--samples", type=int, default=num_samples, help="Monte-Carlo samples per estimate (default %(default)s)"
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=confidence,
        help="confidence of intervals, decisions and certificates (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=seed, help="base seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="points per work unit (default %(default)s)")
    p.add_argument("--tol", type=float, default=margin.tol, help="tolerance of the margin search (default %(default)s)")
    p.add_argument(
        "--max-radius",
        type=float,
        default=margin.max_radius,
        help="margin search limit (default: the box's farthest corner)",
    )
    p.add_argument(
        "--attack-steps", type=int, default=margin.steps, help="max-damage attack steps (default %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(margin_base=margin)


def sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """The shared sweep options as fields of :class:`vaefast.sweep.SweepSpec`.

    Args:
        args: parsed options of :func:`add_sweep_options`.

    Returns:
        ``num_samples``, ``confidence``, ``seed``, ``batch_size`` and ``margin`` (the command's
        :class:`~vaefast.core.options.MarginOptions` with ``--tol``, ``--max-radius`` and ``--attack-steps``).
    """
    margin = dataclasses.replace(args.margin_base, tol=args.tol, max_radius=args.max_radius, steps=args.attack_steps)
    return {
        "num_samples": args.samples,
        "confidence": args.confidence,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "margin": margin,
    }
