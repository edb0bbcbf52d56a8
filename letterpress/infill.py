"""Infilling and inline editing: rows whose one canvas carries clamped (known) positions.

Neither is a separate loop (DESIGN.md). This module *plans* rows, each a context (the prompt the encoder
writes into the KV cache) plus the clamp of its single canvas, and *reads* the committed canvas back;
`LLM.infill` / `LLM.edit` and the server run the rows through the ordinary scheduler, beside any others.

Canvas layouts (C positions; `.` free, `S` suffix token, `T` text token, `E` EOS):

    search   context <bos> prefix            canvas  . . . . S S S S S S S S ... [E E]   one row per length M
    slack    context <bos> prefix            canvas  . . . . . . . . . . S S S S S S     suffix at the end
    edit     context <bos> [instruction\\n] text before the edit
                                             canvas  . . . T T T T . . T T T ... [E E]   spans free

- The suffix goes in the canvas because it is the only place where text after the middle can be seen: the
  context is encoded causally *before* the canvas. Suffix tokens that do not fit in the canvas are cut (the
  model never sees them; they are still part of the returned text). When the suffix ends inside the canvas
  the rest is clamped to EOS: the text ends there.
- The length of the middle is unknown. `search` (the default) denoises several candidate lengths as
  separate rows of one batch and keeps the one the model is surest of (lowest mean entropy over its free
  positions at its last step). `slack` is one row whose free region is everything before the suffix; the
  model ends the middle early with EOS / pad, and what follows is dropped. `prompt` asks for the middle in a
  plain prompt (no clamps), for comparison.
- Reading back: in each run of free positions everything from the first end token (an EOS id or pad) on
  is dropped, as generation drops everything after EOS. Clamped positions come back as they went in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import TYPE_CHECKING

from .engine.request import SamplingParams
from .errors import RequestError
from .sampling import Clamp

if TYPE_CHECKING:
    from .engine.request import RequestOutput
    from .tokenizer import Tokenizer

STRATEGIES = ("search", "slack", "prompt")
DEFAULT_STRATEGY = "search"
Span = tuple[int, int]


# ---------------------------------------------------------------------------------------------- shared
@dataclass(frozen=True)
class Codec:
    """What planning needs to know about a checkpoint (`LLM.infill_codec`)."""

    tokenizer: Tokenizer
    canvas_length: int
    eos_id: int  # written after a text that ends inside the canvas
    end_ids: frozenset[int]  # EOS ids and pad: a free run ends at the first of these
    max_context: int | None = None  # the most context tokens beside one canvas (max_model_len - canvas_length)

    def context(self, text: str) -> list[int]:
        """A prompt: <bos> + tokens of `text`, its start dropped (from a line start) where it would not fit
        beside the canvas: a gap deep in a long file is filled from the text just above it."""
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        if self.max_context is None:
            return bos + self.tokenizer.encode(text)
        per_token = self.tokenizer.max_chars_per_token()
        if per_token is not None and len(text) > (self.max_context + 1) * per_token:
            # more than fits however it tokenizes: tokenize only the tail that can, from a line start
            start = len(text) - (self.max_context + 1) * per_token
            newline = text.find("\n", start)
            text = text[newline + 1:] if newline != -1 else text[start:]
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        return bos + keep_tail(ids, offsets, text, self.max_context - len(bos))


def keep_tail(ids: list[int], offsets: list[tuple[int, int]], text: str, room: int) -> list[int]:
    """The last `room` of `ids` (the tokens of `text`, with their character offsets), starting at the first
    token of a line where a line starts within them; all of `ids` when they fit."""
    if len(ids) <= room or room <= 0:
        return ids if room > 0 else []
    cut = len(ids) - room
    newline = text.find("\n", offsets[cut][0])
    if newline != -1:
        cut = next((k for k in range(cut, len(ids)) if offsets[k][0] > newline), cut)
    return ids[cut:]


@dataclass
class RowPlan:
    """One engine row: its context and its canvas's clamp. `runs` are the [start, end) canvas positions the
    model writes, in order."""

    prompt_ids: list[int]
    clamp: Clamp
    runs: list[Span]


def read_run(canvas: list[int], run: Span, end_ids: frozenset[int]) -> list[int]:
    """The tokens the model wrote in one free run, cut at the first end token."""
    tokens = canvas[run[0]:run[1]]
    stop = next((i for i, t in enumerate(tokens) if t in end_ids), len(tokens))
    return tokens[:stop]


def row_params(params: SamplingParams | None, canvas_length: int) -> SamplingParams:
    """A clamped row commits its whole canvas: one canvas, EOS does not cut it (free runs are cut when read)."""
    if params is not None and params.structured_outputs is not None:
        raise RequestError("structured output does not apply to infill or edit: their canvas is already pinned "
                           "around the gap, and the text written into it is not a whole answer to constrain")
    return replace(params or SamplingParams(), max_new_tokens=canvas_length, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- infill
@dataclass
class Candidate:
    length: int  # free positions before the suffix
    entropy: float  # mean entropy of the free positions at the row's last step
    middle: str
    steps: int


@dataclass
class InfillResult:
    middle: str
    text: str  # prefix + middle + suffix
    strategy: str
    length: int  # free positions of the chosen row (its middle budget)
    middle_tokens: int  # tokens of the middle, end tokens dropped
    steps: int  # denoising steps of the chosen row
    decoder_passes: int  # row passes of every row this infill used (search: all candidates)
    tokens_per_forward: float  # middle_tokens / decoder_passes
    suffix_tokens_seen: int  # suffix tokens that fit in the chosen canvas
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class InfillPlan:
    prefix: str
    suffix: str
    strategy: str
    max_middle: int
    rows: list[RowPlan]
    lengths: list[int]  # per row: free positions before the suffix
    seen: list[int]  # per row: suffix tokens in the canvas


def search_lengths(max_middle: int, count: int = 5) -> list[int]:
    """Candidate middle lengths: `count` values spaced geometrically from max_middle / 8 up to max_middle
    (short middles need finer steps than long ones)."""
    low = max(1, math.ceil(max_middle / 8))
    if count <= 1 or low == max_middle:
        return [max_middle]
    ratio = (max_middle / low) ** (1 / (count - 1))
    return sorted({min(max_middle, max(1, round(low * ratio ** k))) for k in range(count)})


def check_infill_args(prefix: object, suffix: object, max_middle: int, canvas_length: int, strategy: str,
                      lengths: Sequence[int] | None = None) -> None:
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise RequestError("prefix and suffix must be strings")
    if strategy not in STRATEGIES:
        raise RequestError(f"unknown infill strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if lengths is not None and strategy != "search":
        raise RequestError(f"lengths are the search strategy's candidates; strategy {strategy!r} takes none")
    if not isinstance(max_middle, int) or isinstance(max_middle, bool) or not 1 <= max_middle <= canvas_length:
        raise RequestError(f"max_middle_tokens must be an integer in [1, {canvas_length}] (the canvas length), "
                           f"got {max_middle!r}")


def plan_infill(codec: Codec, prefix: str, suffix: str, max_middle: int | None = None, strategy: str = DEFAULT_STRATEGY,
                lengths: Sequence[int] | None = None) -> InfillPlan:
    """The rows of one infill (`prompt` plans no clamped rows: see `prompt_for_infill`)."""
    C = codec.canvas_length
    max_middle = C // 2 if max_middle is None else max_middle
    check_infill_args(prefix, suffix, max_middle, C, strategy, lengths)
    context = codec.context(prefix)
    per_token = codec.tokenizer.max_chars_per_token()  # the canvas shows at most C tokens of the suffix:
    suffix_ids = codec.tokenizer.encode(suffix if per_token is None else suffix[:(C + 2) * per_token])  # tokenize no more
    plan = InfillPlan(prefix, suffix, strategy, max_middle, [], [], [])
    if strategy == "search":
        lengths = search_lengths(max_middle) if lengths is None else sorted(set(lengths))
        if not lengths or any(not isinstance(m, int) or not 1 <= m <= max_middle for m in lengths):
            raise RequestError(f"search lengths must be integers in [1, {max_middle}] (max_middle_tokens)")
        for m in lengths:
            seen = suffix_ids[:C - m]
            pinned = [None] * m + seen + [codec.eos_id] * (C - m - len(seen))
            plan.rows.append(RowPlan(context, Clamp.of(pinned), [(0, m)]))
            plan.lengths.append(m)
            plan.seen.append(len(seen))
    elif strategy == "slack":
        seen = suffix_ids[:C - max_middle]  # at least max_middle free positions
        free = C - len(seen)
        plan.rows.append(RowPlan(context, Clamp.of([None] * free + seen), [(0, free)]))
        plan.lengths.append(free)
        plan.seen.append(len(seen))
    return plan


def finish_infill(codec: Codec, plan: InfillPlan, outputs: list[RequestOutput]) -> InfillResult:
    """Read each row's middle and keep the row with the lowest final free-position entropy (ties: the
    shorter length)."""
    middles = [read_run(out.token_ids, row.runs[0], codec.end_ids)[:plan.max_middle]
               for row, out in zip(plan.rows, outputs)]
    # a row that failed or timed out before finishing its canvas has no entropy: it can never be chosen
    entropies = [out.final_entropy[0] if out.final_entropy else math.inf for out in outputs]
    best = min(range(len(outputs)), key=lambda i: (entropies[i], plan.lengths[i]))
    if math.isinf(entropies[best]):
        failed = next((out.error for out in outputs if out.error is not None), None)
        raise failed if failed is not None else RequestError("no infill candidate finished its canvas")
    passes = sum(out.decoder_passes for out in outputs)
    middle = codec.tokenizer.decode(middles[best])
    return InfillResult(
        middle=middle, text=plan.prefix + middle + plan.suffix, strategy=plan.strategy, length=plan.lengths[best],
        middle_tokens=len(middles[best]), steps=outputs[best].decoder_passes, decoder_passes=passes,
        tokens_per_forward=len(middles[best]) / passes if passes else 0.0, suffix_tokens_seen=plan.seen[best],
        candidates=[Candidate(m, e, codec.tokenizer.decode(ids), out.decoder_passes)
                    for m, e, ids, out in zip(plan.lengths, entropies, middles, outputs)])


PROMPT_HEADER = "# Fill in the missing code. The code after the gap is:\n"
PROMPT_BRIDGE = "# The code before the gap, continued with the missing code:\n"


def prompt_for_infill(prefix: str, suffix: str, suffix_chars: int = 2000) -> str:
    """The `prompt` strategy's prompt: the suffix first (as comments, so the code that follows still reads as
    code), then the prefix, which the model continues. Plain generation; nothing is clamped."""
    shown = suffix[:suffix_chars].splitlines() or [""]
    return PROMPT_HEADER + "".join(f"# | {line}\n" for line in shown) + PROMPT_BRIDGE + prefix


def cut_generated_middle(text: str, suffix: str) -> str:
    """A generated continuation cut where it starts to repeat the suffix (its first non-blank line)."""
    first = next((line.strip() for line in suffix.splitlines() if line.strip()), None)
    if first is None:
        return text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if i > 0 and line.strip() == first:
            return "".join(lines[:i]).rstrip(" \t")
    return text


def prompt_infill_params(codec: Codec, prefixes: list[str], suffixes: list[str], max_middle: int | None,
                         params: SamplingParams | None, lengths: Sequence[int] | None = None) -> SamplingParams:
    """The `prompt` strategy: plain generation of at most max_middle tokens (default half a canvas) from
    `prompt_for_infill`, with these parameters; `finish_prompt_infill` reads each output."""
    C = codec.canvas_length
    max_middle = C // 2 if max_middle is None else max_middle
    for p, s in zip(prefixes, suffixes):
        check_infill_args(p, s, max_middle, C, "prompt", lengths)
    return replace(params or SamplingParams(), max_new_tokens=max_middle)


def finish_prompt_infill(codec: Codec, prefix: str, suffix: str, out: RequestOutput, max_middle: int) -> InfillResult:
    middle = cut_generated_middle(out.text or "", suffix)
    n = len(codec.tokenizer.encode(middle))
    return InfillResult(middle, prefix + middle + suffix, "prompt", max_middle, n, out.decoder_passes,
                        out.decoder_passes, n / max(out.decoder_passes, 1), 0)


# ------------------------------------------------------------------------------------------ line gaps
@dataclass
class LineGap:
    """A file with one line cut out, as an infill. The cut sits *before* newlines: a byte-level BPE merges a
    newline with the next line's indentation ("\n" + "    " is one token), so a prefix ending in "\n" or a
    suffix starting with bare indentation would tokenize unlike anything the model saw. Here the prefix
    ends at the end of the line before the gap (without its newline), the suffix starts with the gap
    line's newline, and the middle is expected as "\n" + the new line(s)."""

    prefix: str
    suffix: str
    lead: str  # "\n", or "" when the gap is the first line

    @classmethod
    def cut(cls, text: str, line: int) -> LineGap:
        lines = _lines(text)
        if not 1 <= line <= len(lines):
            raise RequestError(f"line {line} is out of range: the text has {len(lines)} lines")
        before, gap, after = "".join(lines[:line - 1]), lines[line - 1], "".join(lines[line:])
        lead = "\n" if before.endswith("\n") else ""
        newline = gap[len(gap.rstrip("\r\n")):]
        return cls(before[:len(before) - len(lead)], newline + after, lead)

    @classmethod
    def marked(cls, text: str, line: int) -> LineGap:
        """Like `cut`, for a line that must be a gap marker (only `...` or a `# fill` comment)."""
        lines = _lines(text)
        body = lines[line - 1].strip().lstrip("\ufeff") if 1 <= line <= len(lines) else None
        if body is not None and not (body == "..." or body.lower().startswith("# fill")):
            raise RequestError(f"line {line} is not a gap: mark the line to fill with only `...` or `# fill`")
        return cls.cut(text, line)

    def fill(self, middle: str) -> str:
        """The text with the middle in the gap; the middle always forms whole lines of its own."""
        middle = middle.rstrip("\r\n")
        if self.lead and not middle.startswith(self.lead):
            middle = self.lead + middle
        elif not self.lead and middle.startswith("\n"):  # the first line: nothing above to end with a newline
            middle = middle[1:]
        return self.prefix + middle + self.suffix


def _lines(text: str) -> list[str]:
    """`text`'s lines with their ends, split at "\n" only, as an editor numbers them: str.splitlines also
    splits at form feeds, \x1c-\x1e, \x85 and U+2028/9, which Python source may hold (a form feed is PEP 8's
    page break), and the line numbers after them would not be the editor's."""
    return text.splitlines(keepends=True) if "\n" not in text else [
        line for line in re.split(r"(?<=\n)", text) if line]


# ------------------------------------------------------------------------------------------------ edit
@dataclass
class Replacement:
    start: int  # character range of the input that was regenerated: the span widened to whole tokens
    end: int
    old: str
    new: str


@dataclass
class EditResult:
    text: str
    replacements: list[Replacement]
    steps: int
    written_tokens: int  # tokens the model wrote into the spans (end tokens dropped)
    tokens_per_forward: float  # written_tokens / denoising steps
    context_tokens: int  # text tokens before the canvas (encoded as context)
    tokens_after_canvas: int  # text tokens that did not fit in the canvas (unseen, unchanged; see edit_window)


@dataclass
class EditPlan:
    text: str
    row: RowPlan
    char_ranges: list[Span]  # per run: the characters its tokens cover in `text`
    context_tokens: int
    tokens_after_canvas: int


def check_spans(text: object, spans: object) -> list[Span]:
    """Spans sorted by start; every problem a user can make is a RequestError naming the span."""
    if not isinstance(text, str):
        raise RequestError("the text to edit must be a string")
    if not text:
        raise RequestError("the text to edit is empty")
    if not isinstance(spans, (list, tuple)) or not spans:
        raise RequestError("give at least one span [start, end) of characters to edit")
    checked = []
    for span in spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            raise RequestError(f"a span must be a pair of integers [start, end), got {span!r}")
        start, end = span
        if start > end:
            raise RequestError(f"span [{start}, {end}) ends before it starts")
        if not 0 <= start <= end <= len(text):
            raise RequestError(f"span [{start}, {end}) is out of range: the text has {len(text)} characters")
        if start == end:
            raise RequestError(f"span [{start}, {end}) is empty: it must cover at least one character")
        checked.append((start, end))
    checked.sort()
    for (a, b), (c, d) in pairwise(checked):
        if c < b:
            raise RequestError(f"spans [{a}, {b}) and [{c}, {d}) overlap")
    return checked


def span_tokens(offsets: Sequence[Span], spans: list[Span]) -> list[Span]:
    """Per span, the [first, last] token indices overlapping it; spans that share a token are merged.

    `spans` are sorted and disjoint (check_spans). Token offsets from a tokenizer run left to right (starts
    and ends never decrease), so one sweep over tokens and spans together finds every overlap: O(tokens +
    spans). Offsets that do not run left to right (no tokenizer we know) get the per-span scan instead."""
    if not all(a1 <= a2 and b1 <= b2 for (a1, b1), (a2, b2) in pairwise(offsets)):
        return _span_tokens_scan(offsets, spans)
    runs: list[list[int]] = []
    i, n = 0, len(offsets)
    for start, end in spans:
        while i < n and offsets[i][1] <= start:  # tokens that end before this span cannot reach the next ones
            i += 1
        if i == n or offsets[i][0] >= end:  # only possible with a tokenizer that drops characters
            raise RequestError(f"span [{start}, {end}) covers no token of the text")
        last = i
        while last + 1 < n and offsets[last + 1][0] < end:
            last += 1
        _add_run(runs, i, last)
    return [(a, b) for a, b in runs]


def _span_tokens_scan(offsets: Sequence[Span], spans: list[Span]) -> list[Span]:
    runs: list[list[int]] = []
    for start, end in spans:
        hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if not hit:
            raise RequestError(f"span [{start}, {end}) covers no token of the text")
        _add_run(runs, hit[0], hit[-1])
    return [(a, b) for a, b in runs]


def _add_run(runs: list[list[int]], first: int, last: int) -> None:
    if runs and first <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], last)
    else:
        runs.append([first, last])


def plan_edit(codec: Codec, text: str, spans: Sequence[Span], instruction: str | None = None,
              slack: int = 0) -> EditPlan:
    """The canvas starts at the first edited token: the text before it (after the instruction) is the
    context, the text after the spans is clamped in the canvas as far as it fits, and EOS fills the rest
    when the text ends inside the canvas. Each span's tokens are free, plus `slack` more free positions
    after each span so that the model may write a longer replacement (it ends a shorter one with EOS)."""
    checked = check_spans(text, spans)
    if instruction is not None and not isinstance(instruction, str):
        raise RequestError("instruction must be a string")
    if not isinstance(slack, int) or slack < 0:
        raise RequestError(f"slack_tokens must be an integer >= 0, got {slack!r}")
    C = codec.canvas_length
    head = edit_window(codec, text, checked)
    tail = context_window(codec, text, checked[0][0])
    ids, offsets = codec.tokenizer.encode_with_offsets(text[tail:head])
    offsets = [(a + tail, b + tail) for a, b in offsets] if tail else offsets
    token_runs = span_tokens(offsets, checked)
    start = token_runs[0][0]
    needed = token_runs[-1][1] - start + 1 + slack * len(token_runs)
    if needed > C:
        raise RequestError(f"the edited region spans {needed} tokens (first to last edited token"
                           f"{', plus slack' if slack else ''}); it must fit in one canvas of {C} tokens: "
                           "edit in several calls")
    pinned: list[int | None] = []
    runs: list[Span] = []
    i = start
    for first, last in token_runs:
        pinned += ids[i:first]
        runs.append((len(pinned), len(pinned) + last - first + 1 + slack))
        pinned += [None] * (last - first + 1 + slack)
        i = last + 1
    room = C - len(pinned)
    pinned += ids[i:i + room]
    after = max(0, len(ids) - (i + room))
    if head < len(text):
        after += count_tokens(codec.tokenizer, text, head)
    pinned += [codec.eos_id] * (C - len(pinned))
    context = codec.context(instruction + "\n" if instruction else "")
    room = len(context) + start if codec.max_context is None else codec.max_context - len(context)
    context += keep_tail(ids[:start], offsets[:start], text, room)  # a long text's start may not fit
    char_ranges = [(offsets[a][0], offsets[b][1]) for a, b in token_runs]
    return EditPlan(text, RowPlan(context, Clamp.of(pinned), runs), char_ranges, start, after)


def context_window(codec: Codec, text: str, first: int) -> int:
    """Where to start tokenizing the text before the first span: a line start from which more tokens than the
    context holds surely lie before `first` (max_chars_per_token), so that a span deep in a large text costs
    its context, not its length; 0 when the whole start may fit (or no bound is known)."""
    per_token = codec.tokenizer.max_chars_per_token()
    if per_token is None or codec.max_context is None or first <= (codec.max_context + 1) * per_token:
        return 0
    start = first - (codec.max_context + 1) * per_token
    newline = text.find("\n", start, first)
    return newline + 1 if newline != -1 else start


def edit_window(codec: Codec, text: str, spans: list[Span]) -> int:
    """How much of `text` to tokenize for the plan: every token a canvas starting at the first span can hold,
    and a margin, so that a large text costs its context and one canvas, not its length (the rest is only
    counted, see count_tokens). A region too long for one canvas in characters is refused here, before any
    tokenizing."""
    per_token = codec.tokenizer.max_chars_per_token()
    if per_token is None:  # no bound on characters per token: tokenize everything
        return len(text)
    first, last = spans[0][0], spans[-1][1]
    reach = codec.canvas_length * per_token  # the most characters one canvas of tokens can cover
    if last - first > reach:
        raise RequestError(f"the edited region spans {last - first:,} characters (first to last edited "
                           f"character): more than one canvas of {codec.canvas_length} tokens can hold "
                           f"({reach:,} characters at {per_token} per token at most): edit in several calls")
    return min(len(text), first + reach + 4 * per_token + 64)


def count_tokens(tokenizer: Tokenizer, text: str, start: int, piece: int = 65536) -> int:
    """Tokens of text[start:], counted in pieces of at most `piece` characters cut before a space (a token
    boundary for the tokenizers we ship), so that no single call holds the GIL long: exact but for a token
    here and there at the cuts (it only feeds the tokens_after_canvas statistic)."""
    count = 0
    while start < len(text):
        end = min(len(text), start + piece)
        if end < len(text):
            space = text.rfind(" ", start + piece // 2, end)
            end = space if space > start else end
        count += tokenizer.count_tokens(text[start:end])
        start = end
    return count


def finish_edit(codec: Codec, plan: EditPlan, out: RequestOutput) -> EditResult:
    """Splice each run's new text into the original string, so everything outside the spans is unchanged. A row
    that ended without finishing its canvas (an engine error, a timeout, an abort) raises: its spans hold no
    replacement, and splicing them in would delete the text silently."""
    if out.finish_reason in ("error", "timeout", "abort"):
        raise out.error if out.error is not None else RequestError(f"the edit did not finish ({out.finish_reason})")
    pieces, replacements, at, written = [], [], 0, 0
    for run, (a, b) in zip(plan.row.runs, plan.char_ranges):
        new_ids = read_run(out.token_ids, run, codec.end_ids)
        new = codec.tokenizer.decode(new_ids)
        written += len(new_ids)
        pieces += [plan.text[at:a], new]
        replacements.append(Replacement(a, b, plan.text[a:b], new))
        at = b
    pieces.append(plan.text[at:])
    passes = out.decoder_passes
    return EditResult("".join(pieces), replacements, passes, written, written / passes if passes else 0.0,
                      plan.context_tokens, plan.tokens_after_canvas)
