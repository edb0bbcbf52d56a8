"""`letterpress generate [MODEL] "prompt"`: one completion, printed canvas by canvas, then a stats line."""

from __future__ import annotations

import argparse
import sys
import time

from ..engine.args import add_model_arguments, add_sampling_arguments, llm_from_args, sampling_params
from .printing import CanvasPrinter, stats_line

HELP = "complete one prompt"


def split_model_and_text(words: list[str], parser: argparse.ArgumentParser) -> tuple[str | None, str]:
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    parser.error('expected [MODEL] "prompt"')
    raise AssertionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="+", metavar='[MODEL] "prompt"',
                   help="checkpoint folder or Hub id (optional), then the prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    model, prompt = split_model_and_text(args.words, args.parser)
    llm = llm_from_args(model, args, max_num_seqs=1)
    params = sampling_params(args)
    printer = CanvasPrinter(llm.tokenizer)
    start = time.perf_counter()
    if args.chat_template:
        out = llm.chat([{"role": "user", "content": prompt}], params, listener=printer)[0]
    else:
        out = llm.generate(prompt, params, listener=printer)[0]
    seconds = time.perf_counter() - start
    print()
    print(stats_line(out, seconds), file=sys.stderr)
    return 0
