"""Charts as PNG files: the loss curve `letterpress train` writes beside metrics.jsonl, and the benchmarks' charts.

matplotlib is imported inside the functions (never at import time of this module or the CLI), and only through
its object API (`matplotlib.figure.Figure` rendered by the Agg canvas): no pyplot, so no global figure state,
no GUI backend and no display are needed, and a server or a training loop may call these from any thread.
Every file is written to a temporary name beside the target and renamed, so a reader (a browser, an image
viewer refreshing during training) never sees half a PNG.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import LetterpressError

INSTALL_HINT = "pip install matplotlib (a dependency of letterpress; it was left out of this environment)"


class PlotError(LetterpressError):
    """A chart could not be drawn: matplotlib missing, or no data to draw."""


def _figure(rows: int = 1, height: float = 4.0, sharex: bool = True):
    """(figure, axes list) on the Agg canvas, without pyplot."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"charts need matplotlib: {INSTALL_HINT}") from None
    ratios = [3] + [1] * (rows - 1)
    fig = Figure(figsize=(7.5, height + 1.5 * (rows - 1)), dpi=100, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)  # bars in front of the grid
    return fig, list(axes)


def save_png(fig, out: str | Path) -> Path:
    """Render `fig` to `out` atomically (temporary file in the same folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # open(), not mkstemp: the file gets the umask's permissions (mkstemp's are owner-only)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ loss curve
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (one JSON object per line); a torn last line (a run killed mid-write) is
    skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PlotError(f"cannot read {path}: not a metrics.jsonl (not UTF-8 text: {e.reason} at byte {e.start})"
                        ) from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def loss_curve(records: Sequence[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Training loss (per logged window) and held-out loss (per evaluation) against the optimiser step, with the
    learning rate in a panel below. `records` are metrics.jsonl lines (`read_metrics`)."""
    steps, loss = _series(records, "loss")
    eval_steps, eval_loss = _series(records, "eval_loss")
    lr_steps, lr = _series(records, "lr")
    if not steps and not eval_steps:
        raise PlotError("no loss in the metrics: nothing to draw (a run writes its first line after --log-every steps)")
    fig, (ax, ax_lr) = _figure(rows=2)
    if steps:
        ax.plot(steps, loss, color="tab:blue", linewidth=1.5, label="training loss (mean per logged window)")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, color="tab:orange", marker="o", markersize=4, linewidth=1.2,
                label="held-out loss")
    values = [v for v in loss + eval_loss if v > 0]
    log_y = bool(values) and max(values) > 5 * min(values)  # the first steps' fall would flatten the rest
    if log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 2, 3, 10 rather than 2x10^0, 10^1
    ax.set_ylabel("loss (nats, log scale)" if log_y else "loss (nats)")
    ax.set_title(title or "Training loss")
    ax.legend(loc="upper right")
    if lr_steps:
        ax_lr.plot(lr_steps, lr, color="tab:green", linewidth=1.2)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step")
    return save_png(fig, out)


def plot_metrics_file(metrics: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Draw the loss curve of a metrics.jsonl; default output: loss.png beside it."""
    metrics = Path(metrics)
    out = Path(out) if out is not None else metrics.with_name("loss.png")
    return loss_curve(read_metrics(metrics), out, title or f"Training loss: {metrics.parent.name or metrics.name}")


# -------------------------------------------------------------------------------------------- benchmark charts
def line_chart(x: Sequence[float], series: dict[str, Sequence[float]], out: str | Path, *, title: str,
               xlabel: str, ylabel: str, log_x: bool = False, percent: bool = False) -> Path:
    """One line per series over shared x values (e.g. throughput against concurrency), ticks at those values."""
    return curves({name: (x, ys) for name, ys in series.items()}, out, title=title, xlabel=xlabel, ylabel=ylabel,
                  log_x=log_x, percent=percent, x_ticks=x)


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], out: str | Path, *, title: str, xlabel: str,
           ylabel: str, log_x: bool = False, percent: bool = False, x_ticks: Sequence[float] | None = None,
           marks: dict[str, float] | None = None) -> Path:
    """One line per series, each on its own x values; `marks` = {label: x} draws labelled vertical lines."""
    fig, (ax,) = _figure()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=4, linewidth=1.5, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    if x_ticks is not None:
        ax.set_xticks(list(x_ticks), [f"{v:g}" for v in x_ticks])
    for label, x in (marks or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (x, 0), xytext=(4, 4), textcoords="offset points", fontsize=8, color="dimgrey")
    _finish(ax, title, xlabel, ylabel, percent, legend=len(series) > 1)
    return save_png(fig, out)


def bar_chart(categories: Sequence[str], series: dict[str, Sequence[float]], out: str | Path, *, title: str,
              xlabel: str, ylabel: str, percent: bool = False, labels: bool = True) -> Path:
    """Grouped bars: one group per category, one bar per series (e.g. solve rate by givens, model against
    baseline); each bar carries its value."""
    fig, (ax,) = _figure()
    width = 0.8 / max(len(series), 1)
    for i, (name, ys) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, list(ys), width=width, label=name)
        if labels and len(categories) * len(series) <= 24:  # more would overlap
            ax.bar_label(bars, labels=[(f"{100 * v:.0f}%" if percent else f"{v:.3g}") for v in ys], fontsize=8,
                         padding=2)
    ax.set_xticks(range(len(categories)), list(categories))
    ax.margins(y=0.12)
    _finish(ax, title, xlabel, ylabel, percent, legend=len(series) > 1)
    return save_png(fig, out)


def _finish(ax, title: str, xlabel: str, ylabel: str, percent: bool, legend: bool) -> None:
    if percent:
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, 1.08)
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend()
