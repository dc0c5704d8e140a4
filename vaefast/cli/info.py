"""``vaefast info RUN``: print a run folder's model config and final metrics.

The weights are loaded too, so a missing, truncated or mismatched ``model.safetensors`` is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser("info", help="show a trained model's config and metrics", description=__doc__)
    p.add_argument("run", help="run folder written by 'vaefast train' (or any vaefast.models.save folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object {config, metrics}")
    p.set_defaults(func=run)


def read_metrics(run_dir: Path) -> dict:
    """``run_dir/metrics.json`` as a dict (empty when the folder has none).

    Args:
        run_dir: the run folder.

    Returns:
        The metrics.
    """
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(metrics).__name__}")
    return metrics


def run(args: argparse.Namespace) -> int:
    """Print the run's config and metrics (plain or ``--json``).

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast.cli.train import summary
    from vaefast.models import load

    out = Path(args.run)
    config = load(out).config.to_dict()  # loads and checks the weights, not only config.json
    metrics = read_metrics(out)
    if args.json:
        print(json.dumps({"config": config, "metrics": metrics}, indent=2))
        return 0
    print(summary(config, metrics, out))
    print("config:")
    for key in sorted(config):
        print(f"  {key}: {config[key]}")
    if metrics:
        print("metrics:")
        for key in sorted(metrics):
            print(f"  {key}: {metrics[key]}")
    return 0
