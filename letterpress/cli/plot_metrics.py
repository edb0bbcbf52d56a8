"""`letterpress plot-metrics runs/x/metrics.jsonl [-o loss.png]`: redraw a run's loss curve (the chart
`letterpress train` keeps beside metrics.jsonl), e.g. of a run trained with --no-plot or on another machine."""

from __future__ import annotations

import argparse

HELP = "draw the loss curve of a training run's metrics.jsonl as a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics", help="a metrics.jsonl written by `letterpress train` (or its run folder)")
    p.add_argument("-o", "--output", default=None, help="PNG to write (default: loss.png beside the metrics)")
    p.add_argument("--title", default=None, help="chart title (default: 'Training loss: <run folder>')")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import LetterpressError
    from ..plots import plot_metrics_file

    metrics = Path(args.metrics)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    if args.output is not None and Path(args.output).is_dir():
        raise LetterpressError(f"-o {args.output} is a folder: give the PNG's file name, e.g. "
                               f"{Path(args.output) / 'loss.png'}")
    print(plot_metrics_file(metrics, args.output, args.title))
    return 0
