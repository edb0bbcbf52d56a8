"""`letterpress chat [MODEL]`: interactive multi-turn chat (/reset clears the conversation, /exit quits).

On a terminal, input has readline's line editing and history; from a pipe, each line is one user turn and the
output is a transcript ("you> ..." then "model> ...", a blank line after each reply). Either way each canvas of
a reply is printed as soon as it is committed, and a stats line per reply goes to stderr. On a terminal, Ctrl-C
during a reply stops only that reply; at the prompt it ends chat.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time

from ..engine.args import (add_model_arguments, add_sampling_arguments, check_model_arguments, check_sampling_arguments,
                           llm_from_args, sampling_params)
from ..errors import LetterpressError
from .generate import add_media_arguments, check_media, media_parts, model_for_media
from .printing import CanvasPrinter, stats_line

HELP = "interactive multi-turn chat"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--chat-template", default=None,
                   help="a chat template file, or the template itself, used instead of the checkpoint's (as serve)")
    add_media_arguments(p)
    add_model_arguments(p)
    add_sampling_arguments(p)


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL, --dtype and the sampling flags."""
    check_model_arguments(args.model, args)
    check_sampling_arguments(args)


COMMAND = re.compile(r"/[A-Za-z]+")
HELP = ("/reset  clear the conversation (the --system prompt stays)\n"
        "/exit   quit (also /quit, or Ctrl-D); Ctrl-C during a reply stops that reply\n"
        "/help   this list")


def run(args: argparse.Namespace) -> int:
    template = None
    if args.chat_template is not None:
        from ..tokenizer import load_chat_template

        template = load_chat_template(args.chat_template)
    llm = llm_from_args(model_for_media(args.model, args), args, max_num_seqs=1)
    if template is not None and llm.tokenizer is not None:  # no tokenizer: llm.chat says so
        llm.tokenizer.set_chat_template(template)
    check_media(llm, args)
    params = sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
        print(f"letterpress chat with {llm.model_name}: /reset clears the conversation, /exit or Ctrl-D quits, "
              "/help lists the commands")
    failed = 0  # replies refused or failed: a piped transcript with any ends with exit 1, not 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 1 if failed and not interactive else 0
        text = line.strip()
        if not text:
            continue
        if COMMAND.fullmatch(text):  # a line of one /word is a command, never a question to the model
            if text in ("/exit", "/quit"):
                return 1 if failed and not interactive else 0
            if text == "/reset":
                history = history[:1] if args.system else []
                print("[conversation cleared]", flush=True)
            elif text == "/help":
                print(HELP, flush=True)
            else:
                print(f"unknown command {text}: /help lists them", file=sys.stderr, flush=True)
            continue
        first = not any(m["role"] == "user" for m in history)
        media = media_parts(args) if first else []  # --image / --video go with the first question
        history.append({"role": "user", "content": [*media, {"type": "text", "text": text}] if media else text})
        if not interactive:
            print(f"you> {text}")  # a pipe's input is not echoed: show which question a reply answers
        print("model> ", end="", flush=True)
        start = time.perf_counter()
        try:
            printer = CanvasPrinter(llm.tokenizer)
            with stop_reply_on_interrupt(llm, interactive):
                out = llm.chat(history, params, listener=printer)[0]
            printer.check_open()
        except LetterpressError as e:
            history.pop()
            failed += 1
            print(flush=True)
            earlier = any(m["role"] == "assistant" for m in history)
            hint = " (the earlier turns are part of the prompt: /reset starts a new conversation)" if earlier else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            continue
        if out.finish_reason == "abort":  # Ctrl-C: the reply stops, the conversation goes on without it
            history.pop()
            print("\n[reply stopped: not kept in the conversation]", flush=True)
            continue
        history.append({"role": "assistant", "content": out.text})
        print("\n" if interactive else "\n\n", end="", flush=True)
        print(stats_line(out, time.perf_counter() - start), file=sys.stderr)


@contextlib.contextmanager
def stop_reply_on_interrupt(llm, interactive: bool):
    """On a terminal, the first Ctrl-C during a reply stops that reply (the engine aborts it at the next step,
    as the server does for a client that disconnects) and the chat goes on; a second Ctrl-C ends chat. From a
    pipe, Ctrl-C ends chat at once, as before."""
    if not interactive:
        yield
        return
    pressed = False

    def on_interrupt(signum, frame):
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True
        llm.scheduler.abort_all()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def enable_line_editing() -> None:
    """Arrow keys, history and Ctrl-A/E for `input()` on a terminal (importing readline is what turns them on;
    it is missing on Windows, where the console edits lines itself)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass
