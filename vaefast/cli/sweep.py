"""``vaefast sweep``: models × points × radii (× attack budgets) into an SQLite database; resumable, torchrun-aware.

Example::

    vaefast sweep --model beta1=runs/beta1 --model beta4=runs/beta4 --data digits --split test --points 32 \\
        --radii 0.5 1.0 --eps 0.25 0.5 1.0 --db results.db [--resume] [--device cuda]   # or --radii auto
    torchrun --nproc-per-node=8 --module vaefast sweep ... --device cuda   # one GPU per process
    # 2 machines x 8 GPUs (the run folders and data on both; results.db is written on node 0 only):
    torchrun --nnodes=2 --node-rank=0|1 --nproc-per-node=8 --master-addr=NODE0 --master-port=29500 \\
        --module vaefast sweep ... --device cuda --db results.db

Under torchrun only rank 0 writes ``--db``; the other processes send their units to it. A run killed at any point
(any process) resumes with ``--resume``, with any number of processes.
"""

from __future__ import annotations

import argparse

from vaefast.cli._common import add_sweep_options, model_arg, sweep_options


def _radius_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def radii_arg(values: list[float | str]) -> list[float] | str:
    """``--radii`` as run_sweep takes it.

    Args:
        values: the parsed values (numbers or ``"auto"``).

    Returns:
        The numbers, or ``"auto"`` given alone.
    """
    if "auto" in values:
        if len(values) != 1:
            raise ValueError("--radii: give numbers or 'auto' alone, not both")
        return "auto"
    return [float(v) for v in values]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser(
        "sweep",
        help="sweep models x points x radii into an SQLite results database",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        dest="models",
        type=model_arg,
        action="append",
        required=True,
        help="NAME=SOURCE (repeat): a run folder, diffusers:PATH (a local AutoencoderKL folder) or module:function "
        "(a Python function returning the model); SOURCE alone is named by its folder",
    )
    p.add_argument("--data", default="digits", help="dataset name for vaefast.data.load (default digits)")
    p.add_argument("--split", default="test")
    p.add_argument("--root", default=None, help="dataset root folder (real datasets)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--points", type=int, default=32, help="use the first N points of the split (default 32)")
    g.add_argument("--indices", type=int, nargs="+", help="explicit point indices")
    p.add_argument(
        "--radii",
        "--r",
        dest="radii",
        type=_radius_arg,
        nargs="+",
        required=True,
        help="radii r, or 'auto' (quantiles of the points' smallest robust radii r*); under torchrun spell it "
        "--radii (torchrun takes --r for its own --rdzv-* options)",
    )
    p.add_argument("--eps", type=float, nargs="*", default=[], help="attack budgets for p_hat-vs-norm curves")
    p.add_argument("--curve-r", type=float, nargs="*", default=None, help="radii at which to draw curves (default all)")
    p.add_argument("--db", default="results.db", help="results database (default results.db)")
    p.add_argument("--resume", action="store_true", help="continue a sweep already in --db")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda, cuda:N, or auto (cuda when a GPU is visible); under torchrun a plain cuda is each "
        "process's GPU cuda:LOCAL_RANK",
    )
    add_sweep_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sweep, then print (on rank 0) what was computed, the per (model, r) table and the headline.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast import report, store
    from vaefast._checks import check_device, check_positive_int
    from vaefast.sweep import PointSet, run_sweep

    names = [n for n, _ in args.models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model names must be unique, got {names}")
    store.check_database_target(args.db, "--db")
    if args.indices is None:
        check_positive_int("--points", args.points)
    elif len(set(args.indices)) != len(args.indices):
        repeated = sorted({i for i in args.indices if args.indices.count(i) > 1})
        raise ValueError(f"--indices must be distinct (a point is swept once), got {repeated} more than once")
    points = PointSet.from_dataset(args.data, args.split, args.indices or args.points, root=args.root)
    res = run_sweep(
        dict(args.models), points, radii_arg(args.radii), args.db, attack_eps=args.eps, curve_radii=args.curve_r,
        resume=args.resume, progress=not args.no_progress, device=check_device("--device", args.device),
        **sweep_options(args),
    )  # fmt: skip
    if res.rank == 0:
        data = report.load(args.db)
        computed = res.units_computed + res.units_received
        print(
            f"{args.db}: {computed} units computed, {res.units_skipped} already done "
            f"({res.world_size} process{'es' if res.world_size > 1 else ''}, {res.seconds:.1f} s)"
        )
        print(report.format_table(report.summary_rows(data), report.SUMMARY_COLUMNS))
        print(report.format_headline(report.headline(data)))
    return 0
