"""Command line: one module per verb, each parsing its arguments, calling the library and printing.

    letterpress generate [MODEL] "prompt"     one completion, then a stats line            (cli/generate.py)
    letterpress chat [MODEL]                  interactive multi-turn chat (/reset, /exit)   (cli/chat.py)
    letterpress infill FILE [MODEL] --line N  fill the gap marked at line N                 (cli/infill.py)
    letterpress edit FILE [MODEL] --span A:B  rewrite characters A..B of FILE, keep the rest (cli/edit.py)
    letterpress serve [MODEL]                 OpenAI-compatible HTTP server                 (cli/serve.py)
    letterpress run-batch -i IN -o OUT        a JSONL file of OpenAI Batch API requests     (cli/run_batch.py)
    letterpress train --model CKPT --data F   fine-tune, full or LoRA                       (cli/train.py)
    letterpress merge-lora CKPT ADAPTER OUT   fold a LoRA adapter into its base checkpoint  (cli/merge_lora.py)
    letterpress quantize MODEL OUT --format F write an int8/int4/fp8 compressed-tensors checkpoint (cli/quantize.py)
    letterpress sudoku "<81 cells>"           solve a Sudoku with the embedded Sudoku model (cli/sudoku.py)
    letterpress plot-metrics METRICS.jsonl    draw a training run's loss curve as a PNG     (cli/plot_metrics.py)

With no MODEL the embedded default model is used. MODEL is a local checkpoint folder or a Hub id.

Importing this package and building the parser imports no torch: every verb module is light at import time and
loads the engine inside its `run`, so `--help`, argument errors and shell completion are instant; a verb's
`check` refuses bad values (a missing folder, an unknown dtype, a sampling flag out of range, a busy port) before
torch loads.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import LetterpressError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# verb -> module in this package defining HELP, add_arguments(parser) and run(args) -> exit code, and optionally
# check(args): the checks of its arguments that need neither torch nor the model, run before either loads
VERBS = {"generate": "generate", "chat": "chat", "infill": "infill", "edit": "edit", "serve": "serve",
         "run-batch": "run_batch", "train": "train", "merge-lora": "merge_lora", "quantize": "quantize",
         "sudoku": "sudoku", "plot-metrics": "plot_metrics"}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every verb takes (after the verb: `letterpress generate -v ...`)."""
    g = p.add_argument_group("output and threads (every command)")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log messages: -v adds letterpress's debug messages, -vv every library's")
    g.add_argument("-q", "--quiet", action="count", default=0,
                   help="fewer log messages: -q warnings and errors only, -qq errors only")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads torch uses (default: $OMP_NUM_THREADS if set, else the cores the load average "
                        "shows idle, at least 1)")


def configure_logging(verbose: int, quiet: int) -> int:
    """letterpress's loggers at INFO by default (a training resume, the server's requests), one more level per
    -v / fewer per -q; other libraries' loggers at WARNING unless -vv. Returns letterpress's level."""
    level = min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else max(level, logging.WARNING), format=LOG_FORMAT,
                        stream=sys.stderr)
    logging.getLogger("letterpress").setLevel(level)
    return level


MAX_THREADS = 1024  # torch's pool cannot start 100,000 threads (a segfault), and no machine here has the cores


def default_threads() -> int:
    """Threads for a machine others may be using: $OMP_NUM_THREADS when set, else the usable cores minus the
    1-minute load average (rounded), at least 1. torch's own default, one thread per physical core, made a
    `generate` 3.8x slower (median) on a 2-core machine busy with other work (BENCHMARKS.md, "Threads")."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def set_threads(threads: int | None) -> int:
    import torch

    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n


def check_common_arguments(args: argparse.Namespace) -> None:
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        args.parser.error(f"--threads must lie in [1, {MAX_THREADS}], got {args.threads}")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="letterpress", description="Run, serve and fine-tune block-diffusion language models (DiffusionGemma).")
    parser.add_argument("--version", action="version", version=f"letterpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in VERBS.items():
        verb = importlib.import_module(f".{module_name}", __name__)
        p = sub.add_parser(name, help=verb.HELP, description=verb.HELP)
        verb.add_arguments(p)
        add_common_arguments(p)
        p.set_defaults(run=verb.run, check=getattr(verb, "check", None), parser=p)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # name the verb's own usage, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    check_common_arguments(args)
    return args


def configure_streams() -> None:
    """No verb dies on an encoding: a pipe or file on standard input or output is UTF-8 whatever the locale (a
    byte-order mark on input skipped, as PowerShell and Notepad write one), and a character the terminal's
    encoding cannot show is replaced, not a UnicodeEncodeError after the model has done its work."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if not hasattr(stream, "reconfigure"):  # replaced by a test harness or an embedding program
            continue
        try:
            if stream is sys.stdin and not stream.isatty():
                stream.reconfigure(encoding="utf-8-sig", errors="replace")
            elif stream is sys.stdout and not stream.isatty():
                stream.reconfigure(encoding="utf-8", errors="replace")
            else:
                stream.reconfigure(errors="replace")
        except (OSError, ValueError):  # a closed or detached stream
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_streams()
    try:
        configure_logging(args.verbose, args.quiet)
        if args.check is not None:  # a bad value is refused at once, not after seconds of loading torch
            args.check(args)
        if getattr(args, "device", None):  # before any weight loads: a one-line error, not a traceback
            from ..engine.args import check_device

            check_device(args.device)
        logging.getLogger("letterpress.cli").debug("%d torch thread(s)", set_threads(args.threads))
        return args.run(args)
    except LetterpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool does
        from .printing import silence_stdout

        silence_stdout()
        return 1
