"""`letterpress infill` and `letterpress edit`: arguments and printing; the work is `LLM.infill` / `LLM.edit`.

    letterpress infill FILE [MODEL] --line N       fill the gap marked at line N (`...` or `# fill`)
    letterpress edit FILE [MODEL] --span START:END  rewrite characters START..END (repeatable), keep the rest

Both print the whole resulting file to stdout (or write it back with --in-place) and a stats line to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import RequestError
from .infill import DEFAULT_STRATEGY, STRATEGIES, LineGap, check_spans


def add_common(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments

    p.add_argument("file", help="the source file")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--in-place", action="store_true", help="write the result back to FILE instead of printing it")
    add_model_arguments(p)
    g = p.add_argument_group("sampling (defaults come from the checkpoint's generation_config.json)")
    g.add_argument("--max-denoising-steps", type=int, default=None)
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="fixes the output (per-request generator)")


def infill_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--line", type=int, required=True, help="1-based line holding only `...` or a `# fill` comment")
    p.add_argument("--max-middle-tokens", type=int, default=None, help="budget of the middle (default: half a canvas)")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help=f"how the middle's length is found (default {DEFAULT_STRATEGY}; README, 'Infilling and editing')")


def edit_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--span", action="append", required=True, metavar="START:END",
                   help="character range to rewrite (0-based, END exclusive); repeat for several")
    p.add_argument("--instruction", default=None, help="put before the text in the context, e.g. '# use a loop'")
    p.add_argument("--slack-tokens", type=int, default=0, help="extra free tokens after each span (default 0)")


def params(args: argparse.Namespace):
    from .engine.request import SamplingParams

    return SamplingParams(max_denoising_steps=args.max_denoising_steps, entropy_bound=args.entropy_bound,
                          t_min=args.t_min, t_max=args.t_max, seed=args.seed)


def load(args: argparse.Namespace):
    from .cli import attach_profiler, engine_options
    from .engine.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              offline=True if args.offline else None, max_num_seqs=8, **engine_options(args))
    attach_profiler(llm, args)
    return llm


def read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read {path}: {e}") from e


def emit(args: argparse.Namespace, text: str, stats: str) -> int:
    if args.in_place:
        Path(args.file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(stats, file=sys.stderr)
    return 0


def run_infill(args: argparse.Namespace) -> int:
    gap = LineGap.marked(read(args.file), args.line)  # checked before the model loads
    llm = load(args)
    start = time.perf_counter()
    out = llm.infill(gap.prefix, gap.suffix, args.max_middle_tokens, params(args), strategy=args.strategy)
    return emit(args, gap.fill(out.middle),
                f"[{out.strategy}: middle of {out.middle_tokens} tokens (budget {out.length}), "
                f"{out.steps} steps, {out.decoder_passes} row passes, {out.tokens_per_forward:.2f} tokens/forward, "
                f"{time.perf_counter() - start:.1f} s]")


def parse_span(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        if sep:
            return int(start), int(end)
    except ValueError:
        pass
    raise RequestError(f"--span takes START:END (two integers), got {text!r}")


def run_edit(args: argparse.Namespace) -> int:
    text = read(args.file)
    spans = check_spans(text, [parse_span(s) for s in args.span])  # checked before the model loads
    llm = load(args)
    start = time.perf_counter()
    out = llm.edit(text, spans, args.instruction, params(args), slack_tokens=args.slack_tokens)
    return emit(args, out.text, f"[{len(out.replacements)} span(s), {out.written_tokens} tokens written, "
                                f"{out.steps} steps, {out.tokens_per_forward:.2f} tokens/forward, "
                                f"{time.perf_counter() - start:.1f} s]")
