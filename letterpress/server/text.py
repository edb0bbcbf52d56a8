"""One choice's text as its canvases arrive: incremental detokenization and stop strings.

The streamed deltas and the non-streamed text come from this same object, so they always agree. Two
things are held back from a delta until the next canvas decides them:
- trailing U+FFFD: a BPE piece can end in the middle of a UTF-8 character that the next canvas completes;
- a tail that could be the start of a stop string (the rest may arrive in the next canvas).
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class ChoiceText:
    def __init__(self, decode: Callable[[list[int]], str], stops: list[str],
                 select: Callable[[list[int]], list[int]] | None = None):
        self.decode = decode
        self.stops = stops
        # maps a committed canvas to this choice's tokens (infill: the middle, without the clamped suffix)
        self.select = select
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already handed out as deltas
        self.stopped = False  # a stop string was found: the choice is over

    def add_canvas(self, token_ids: list[int]) -> str:
        """Take one finished canvas; return the new text that is safe to send."""
        self.token_ids.extend(token_ids if self.select is None else self.select(token_ids))
        self._update(self.decode(self.token_ids))
        return self._take(final=self.stopped)

    def finish(self, token_ids: list[int]) -> str:
        """The row is done (the engine's final token ids): return whatever was still held back."""
        token_ids = token_ids if self.select is None else self.select(token_ids)
        if not self.stopped and token_ids != self.token_ids:  # normally equal: canvases already carried them
            self.token_ids = list(token_ids)
            self._update(self.decode(self.token_ids))
        return self._take(final=True)

    def completion_tokens(self) -> int:
        """Tokens through the one that completes the stop string (all of them when no stop string hit)."""
        if not self.stopped:
            return len(self.token_ids)
        # The shortest prefix whose text contains a stop string; "contains" only grows with the prefix.
        lo, hi = 1, len(self.token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._find_stop(self.decode(self.token_ids[:mid])) is None:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # ----------------------------------------------------------------------------------------------------
    def _update(self, text: str) -> None:
        cut = self._find_stop(text)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _held_back(self) -> int:
        # The stop prefix is looked for before the U+FFFD tail: a half-decoded character may complete a stop
        # string, and text ending in U+FFFD ends with no prefix of one. Both are held back.
        whole = self.text.rstrip(REPLACEMENT)
        prefix = 0
        for stop in self.stops:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, len(whole)), prefix, -1):
                if whole.endswith(stop[:k]):
                    prefix = k
                    break
        return len(self.text) - len(whole) + prefix
