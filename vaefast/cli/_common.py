"""Pieces shared by the per-model subcommands (``estimate``, ``margin``): model + points, CSV output."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch


def add_model_and_points_options(p: argparse.ArgumentParser) -> None:
    """``RUN`` plus the dataset / point-range / device options."""
    p.add_argument("run", help="model folder (written by 'vaefast train' or model.save)")
    p.add_argument("--data", default="digits", help="dataset name for vaefast.data.load (default: digits)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--root", default=None, help="dataset folder for file-based datasets")
    p.add_argument("--points", type=int, default=100, help="N points of the split from --start (default 100)")
    p.add_argument("--start", type=int, default=0, help="index of the first point (RNG key of point i is its index)")
    p.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when a GPU is visible, else cpu)"
    )


def load_model_and_points(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model of ``args.run`` (eval mode) and points ``start .. start + points`` of the data split.

    Args:
        args: parsed options of :func:`add_model_and_points_options`.

    Returns:
        ``(model, x)``, both on the ``--device`` (``auto``: cuda when a GPU is visible, else cpu).

    Raises:
        ValueError: a bad ``--device`` (e.g. cuda without a GPU), ``--points`` < 1, or a point range past the end
            of the split (naming the number of points available).
    """
    from vaefast import data, models
    from vaefast._checks import check_device, check_positive_int

    check_positive_int("--points", args.points)
    check_positive_int("--start", args.start, minimum=0)
    device = check_device("--device", args.device)
    model = models.load(args.run, map_location=device).eval()
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
    return model, split.x[args.start : args.start + args.points].to(device)


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
