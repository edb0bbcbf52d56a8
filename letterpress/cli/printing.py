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


class ProgressLines:
    """A progress report for a log file: where a terminal gets tqdm's bar, a stream that is not one gets a line
    every `every` seconds and one at the end ("run-batch: 120/220 requests (54.5%), 12.3 s"), not a bar's
    carriage returns. The part of tqdm's interface run-batch uses: update(), close(), a context manager."""

    def __init__(self, total: int | None, label: str, unit: str, file=None, every: float = 30.0):
        import time

        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.file = file if file is not None else sys.stderr
        self.done, self._clock = 0, time.perf_counter
        self.start = self.last = self._clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self.last >= self.every:
            self._line(now)

    def close(self) -> None:
        if self.done:
            self._line(self._clock())

    def _line(self, now: float) -> None:
        self.last = now
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        print(f"{self.label}: {self.done}{of} {self.unit}{share}, {self.last - self.start:.1f} s", file=self.file,
              flush=True)

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, label: str, unit: str):
    """tqdm's bar on a terminal's stderr, ProgressLines elsewhere (a log file, a pipe)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=label, file=sys.stderr)
    return ProgressLines(total, label, unit)
