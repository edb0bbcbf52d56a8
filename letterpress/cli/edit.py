"""`letterpress edit FILE [MODEL] --span START:END`: rewrite characters START..END (repeatable), keep the rest;
the work is `LLM.edit`. Prints the whole resulting file (or writes it back with --in-place) and a stats line."""

from __future__ import annotations

import argparse
import time

from ..engine.args import sampling_params
from ..errors import RequestError
from .infill import add_file_arguments, check, emit, load, read  # noqa: F401 (check: this verb's, as infill's)

HELP = "rewrite character spans of a file, keeping the rest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_file_arguments(p)
    p.add_argument("--span", action="append", required=True, metavar="START:END",
                   help="character range to rewrite (0-based, END exclusive; a CRLF line ending counts as one "
                        "character, a byte-order mark none); repeat for several")
    p.add_argument("--instruction", default=None, help="put before the text in the context, e.g. '# use a loop'")
    p.add_argument("--slack-tokens", type=int, default=0, help="extra free tokens after each span (default 0)")


def parse_span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        if sep:
            return int(start), int(end)
    except ValueError:
        pass
    raise RequestError(f"--span takes START:END (two integers), got {text!r}")


def run(args: argparse.Namespace) -> int:
    from ..infill import check_spans

    source = read(args.file)
    text = source.text
    spans = check_spans(text, [parse_span(s) for s in args.span])  # checked before the model loads
    llm = load(args)
    start = time.perf_counter()
    out = llm.edit(text, spans, args.instruction, sampling_params(args), slack_tokens=args.slack_tokens)
    return emit(args, source, out.text, f"[{len(out.replacements)} span(s), {out.written_tokens} tokens written, "
                                f"{out.steps} steps, {out.tokens_per_forward:.2f} tokens/forward, "
                                f"{time.perf_counter() - start:.1f} s]")
