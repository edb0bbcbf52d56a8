"""What `generate` and `chat` print: each canvas's text as it is committed, and the stats line."""

from __future__ import annotations

import os
import sys


def stats_line(out, seconds: float) -> str:
    steps = "+".join(str(s) for s in out.steps_per_canvas)
    rate = len(out.token_ids) / seconds if seconds > 0 else 0.0
    return (f"[{len(out.token_ids)} tokens, {out.canvases} canvas(es), steps {steps}, "
            f"{out.tokens_per_forward:.2f} tokens/forward, {rate:.1f} tokens/s, finish: {out.finish_reason}]")


class CanvasPrinter:
    """Prints each canvas's text as soon as the canvas is committed, so long generations show progress.
    Decodes the cumulative ids and prints the new suffix (a canvas may end inside a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""
        self.closed = False  # stdout's reader went away (`| head`): the command stops after this reply

    def __call__(self, event) -> None:
        if not event.final or self.closed:
            return
        self.ids.extend(event.token_ids)
        if self.tokenizer is None:
            text = " ".join(map(str, self.ids)) + " "
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return  # wait for the rest of the character
        try:
            print(text[len(self.printed):], end="", flush=True)
        except BrokenPipeError:  # raised here it would fail the request in the engine, logged as an engine error
            self.closed = True
        self.printed = text

    def check_open(self) -> None:
        """Raise BrokenPipeError, which the CLI ends on quietly, if printing found stdout closed."""
        if self.closed:
            raise BrokenPipeError("standard output was closed")


def silence_stdout() -> None:
    """Standard output's reader went away: point the descriptor at /dev/null, so that nothing more (the exit's
    own flush included) fails on it."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
