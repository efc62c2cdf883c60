"""Command-line flags for the registered metrics' weight files, for the parsers of compare and search."""

from __future__ import annotations

import argparse

from flux2lab.metrics.registry import METRICS


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --<metric>-weights PATH for every registered metric with weights, and --skip-missing."""
    for name, metric in METRICS.items():
        if metric.weights is not None:
            parser.add_argument(
                metric.weights.flag,
                metavar="PATH",
                dest=f"{name}_weights",
                help=f"{name} weight file or folder (default: ${metric.weights.env_var}, then the standard cache)",
            )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip metrics whose weights are missing instead of stopping",
    )


def weight_paths(args: argparse.Namespace) -> dict[str, str]:
    """The --<metric>-weights values given on the command line, as `check_weights` takes them."""
    return {
        name: getattr(args, f"{name}_weights") for name in METRICS if getattr(args, f"{name}_weights", None)
    }
