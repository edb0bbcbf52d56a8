"""`letterpress chat [MODEL]`: interactive multi-turn chat (/reset clears the conversation, /exit quits)."""

from __future__ import annotations

import argparse
import sys
import time

from ..engine.args import add_model_arguments, add_sampling_arguments, llm_from_args, sampling_params
from ..errors import LetterpressError
from .printing import stats_line

HELP = "interactive multi-turn chat"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--system", default=None, help="a system prompt")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    llm = llm_from_args(args.model, args, max_num_seqs=1)
    params = sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"letterpress chat with {llm.model_name}: /reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        start = time.perf_counter()
        try:
            out = llm.chat(history, params)[0]
        except LetterpressError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": out.text})
        print(("model> " if interactive else "") + out.text)
        print(stats_line(out, time.perf_counter() - start), file=sys.stderr)
