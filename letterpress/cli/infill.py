"""`letterpress infill FILE [MODEL] --line N`: fill the gap marked at line N (`...` or `# fill`); the work is
`LLM.infill`. Prints the whole resulting file to stdout (or writes it back with --in-place) and a stats line to
stderr. The file helpers here are shared with `letterpress edit` (cli/edit.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine.args import (add_model_arguments, add_sampling_arguments, check_model_arguments, check_sampling_arguments,
                           llm_from_args, sampling_params)
from ..errors import RequestError

HELP = "fill a marked gap (a `...` or `# fill` line) in a file"
# letterpress.infill's, repeated so that parsing imports no torch (tests/test_cli.py checks they agree)
STRATEGIES = ("search", "slack", "prompt")
DEFAULT_STRATEGY = "search"


def add_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the source file")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--in-place", action="store_true", help="write the result back to FILE instead of printing it")
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_file_arguments(p)
    p.add_argument("--line", type=int, required=True, help="1-based line holding only `...` or a `# fill` comment")
    p.add_argument("--max-middle-tokens", type=int, default=None, help="budget of the middle (default: half a canvas)")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help=f"how the middle's length is found (default {DEFAULT_STRATEGY}; README, 'Infilling and editing')")


def load(args: argparse.Namespace):
    return llm_from_args(args.model, args, max_num_seqs=8)


def read(path: str) -> str:
    """The file's text with its line endings read as "\n" (what the model and --line / --span see); `emit`
    writes CRLF back to a file that had it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read {path}: {e}") from e


def line_ending(path: str) -> str:
    with open(path, "rb") as f:
        return "\r\n" if b"\r\n" in f.read() else "\n"


def write_in_place(path: str, text: str) -> None:
    """Replace the file in one step: the text goes to a temporary file beside it (same mode, same line endings),
    then takes its name, so a full disk or a Ctrl-C leaves the old file whole instead of a truncated one."""
    import os
    import tempfile

    target = Path(path).resolve()
    newline = line_ending(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with open(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RequestError(f"cannot write {path}: {e.strerror or e}; the file is unchanged") from None
        raise


def emit(args: argparse.Namespace, text: str, stats: str) -> int:
    if args.in_place:
        write_in_place(args.file, text)
    else:
        sys.stdout.write(text)
    print(stats, file=sys.stderr)
    return 0


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL, --dtype and the sampling flags (infill's and edit's)."""
    check_model_arguments(args.model, args)
    check_sampling_arguments(args)


def run(args: argparse.Namespace) -> int:
    from ..infill import LineGap

    gap = LineGap.marked(read(args.file), args.line)  # checked before the model loads
    llm = load(args)
    start = time.perf_counter()
    out = llm.infill(gap.prefix, gap.suffix, args.max_middle_tokens, sampling_params(args), strategy=args.strategy)
    return emit(args, gap.fill(out.middle),
                f"[{out.strategy}: middle of {out.middle_tokens} tokens (budget {out.length}), "
                f"{out.steps} steps, {out.decoder_passes} row passes, {out.tokens_per_forward:.2f} tokens/forward, "
                f"{time.perf_counter() - start:.1f} s]")
