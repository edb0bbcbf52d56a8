"""Split a chat model's decoded output into reasoning, content and OpenAI tool calls.

The Gemma 4 chat format (DiffusionGemma's) writes its thoughts in a channel, `<|channel>thought\\n...<channel|>`
(some models write `<think>...</think>` instead), and tool calls as
`<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,flag:true,obj:{...},list:[...]}<tool_call|>`; `<turn|>` and
`<|tool_response>` end the model's turn. The text must be decoded with special tokens kept
(`skip_special_tokens=False`) so the markers are there to find.

`StreamParser` takes the text in pieces of any size (a block-diffusion engine commits a canvas at a time, so a
marker can straddle two canvases) and returns what can be shown so far; it holds back a tail that could still
grow into a marker. `parse_output` runs it over a whole text, so both give the same result. Nothing here raises
on model output: what does not parse stays content.

This module knows only text: no tokenizer, engine or server.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_QUOTE = '<|"|>'
# Markers after which the model's turn is over (the engine normally stops on them already).
TURN_ENDS = ("<turn|>", "<|tool_response>", "<|turn>")
# The label the model writes at the start of its thought channel.
THOUGHT_LABEL = "thought\n"
# Control tokens of the format that are never shown when they turn up out of place.
_STRAY = (CHANNEL_CLOSE, THINK_CLOSE, CALL_CLOSE, "<|think|>", "<|tool>", "<tool|>", "<tool_response|>")
_BARE_CALL = "call:"
# Where a call without its <|tool_call> is looked for besides the start of the answer: at the start of a line,
# and after "<call>" (a fragment of the marker seen with multimodal prompts).
_LINE_CALL, _FRAGMENT_CALL = "\ncall:", "<call>"
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_JSON = json.JSONDecoder()

_CONTENT, _REASONING, _CALL, _DONE = "content", "reasoning", "call", "done"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One call in OpenAI's terms: `arguments` is a JSON object as a string."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatDelta:
    """A piece of output: text for the content or the reasoning, or one whole tool call."""

    content: str = ""
    reasoning: str = ""
    tool_call: ToolCall | None = None


@dataclass
class ChatOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, deltas: Iterable[ChatDelta]) -> ChatOutput:
        for delta in deltas:
            self.content += delta.content
            self.reasoning += delta.reasoning
            if delta.tool_call is not None:
                self.tool_calls.append(delta.tool_call)
        return self


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open thought channel (Gemma 4 templates write
    `<|channel>thought\\n` after tool responses when thinking is on), so the output starts as reasoning."""
    return prompt.rfind(CHANNEL_OPEN) > prompt.rfind(CHANNEL_CLOSE)


def parse_output(text: str, **options) -> ChatOutput:
    """The reasoning, content and tool calls of one whole output (options as for StreamParser). Unless
    `start_in_reasoning` is given, an output whose first channel marker is a close (`<channel|>` before any
    `<|channel>`) began inside a thought the prompt opened (thinking on, after a tool response): what comes
    before the close is reasoning, as R1-style parsers read a leading `</think>`, not content glued to the answer."""
    if "start_in_reasoning" not in options:
        close, opened = text.find(CHANNEL_CLOSE), text.find(CHANNEL_OPEN)
        options["start_in_reasoning"] = close != -1 and (opened == -1 or close < opened)
    parser = StreamParser(**options)
    return ChatOutput().add([*parser.feed(text), *parser.finish()])


class StreamParser:
    """Incremental parser: `feed(piece)` returns the deltas that are certain so far, `finish()` the rest.

    tool_calls: parse tool calls (False: they stay content, as for a request without tools).
    tool_names: when given, a bare `call:NAME{...}` (no `<|tool_call>`) counts as a call only for these names.
    start_in_reasoning: the prompt ended inside an open thought channel (see prompt_opens_reasoning).
    hidden: more token strings to drop from the output (e.g. the tokenizer's `<eos>`, `<pad>`).
    """

    def __init__(
        self,
        tool_calls: bool = True,
        tool_names: Collection[str] | None = None,
        start_in_reasoning: bool = False,
        hidden: Collection[str] = (),
        make_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._tool_calls = tool_calls
        self._tool_names = None if tool_names is None else set(tool_names)
        stray = _STRAY if tool_calls else tuple(s for s in _STRAY if s != CALL_CLOSE)
        self._hidden = tuple(h for h in hidden if h) + stray
        self._make_id = make_id
        self._buffer = ""
        self._state = _REASONING if start_in_reasoning else _CONTENT
        self._reasoning_close = CHANNEL_CLOSE
        self._segment_start = True  # at the start of a reasoning segment (its label may follow)
        self._reasoning_fresh = True  # no reasoning text shown yet in this segment
        self._content_started = False  # visible content was emitted (a bare call can no longer start)
        self._held_space = ""  # trailing whitespace of the content, shown only if more text follows
        self._held_thought_space = ""  # the same for the reasoning
        self._lstrip_next = False  # a thought or call just ended: drop the whitespace that follows it
        self._marker_since_held = False  # a thought or call started after the held whitespace
        self._bare_shown: str | None = None  # a possible bare call was found: the text to show if it is not one

    # ---- public ------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[ChatDelta]:
        self._buffer += text
        out: list[ChatDelta] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        while self._step(out, final=True):
            pass
        if self._state == _CALL:  # the canvas ended before <tool_call|>: take the call if it is whole
            self._end_call(self._buffer, out, closed=False)
        elif self._state == _CONTENT and self._buffer:
            self._emit_text(self._buffer, out, final=True)
        elif self._state == _REASONING and self._buffer:
            self._emit_text(self._buffer, out, final=True)
        if self._held_space and not self._marker_since_held:
            out.append(ChatDelta(content=self._held_space))
        self._buffer, self._state, self._held_space = "", _DONE, ""
        return out

    # ---- the state machine -------------------------------------------------------------------------------

    def _step(self, out: list[ChatDelta], final: bool) -> bool:
        """Consume what can be consumed from the buffer; True if progress was made and another step may help."""
        if self._state == _DONE:
            self._buffer = ""
            return False
        if self._state == _CALL:
            return self._step_call(out)
        if self._state == _REASONING and self._segment_start:
            label = self._buffer
            if len(label) < len(THOUGHT_LABEL) and THOUGHT_LABEL.startswith(label) and not final:
                return False  # could still be the label
            if label.startswith(THOUGHT_LABEL):
                self._buffer = label[len(THOUGHT_LABEL):]
            self._segment_start = False
        if self._state == _CONTENT and self._tool_calls and (not self._content_started or self._bare_shown):
            bare = self._try_bare_call(out, final)
            if bare is None and self._bare_shown is not None:  # not a call after all: it is text
                self._buffer = self._buffer[len(_BARE_CALL):]
                self._emit_text(self._bare_shown, out, final=False)
                self._bare_shown = None
                return True
            if bare is not None:
                self._bare_shown = None if bare else self._bare_shown
                return bare

        markers = self._markers()
        found, at = _earliest(self._buffer, markers)
        if found is None:
            keep = 0 if final else _partial_suffix(self._buffer, markers)
            ready = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(ready):]
            if ready:
                self._emit_text(ready, out, final=False)
            return False
        self._emit_text(self._buffer[:at], out, final=False)
        self._buffer = self._buffer[at + len(found):]
        self._on_marker(found, out)
        return True

    def _markers(self) -> tuple[str, ...]:
        if self._state == _REASONING:
            opens = (CALL_OPEN,) if self._tool_calls else ()
            return (self._reasoning_close, *opens, *TURN_ENDS, CHANNEL_OPEN, THINK_OPEN, *self._hidden)
        opens = (CALL_OPEN, _LINE_CALL, _FRAGMENT_CALL) if self._tool_calls else ()
        return (CHANNEL_OPEN, THINK_OPEN, *opens, *TURN_ENDS, *self._hidden)

    def _on_marker(self, marker: str, out: list[ChatDelta]) -> None:
        if marker in TURN_ENDS:
            self._marker_since_held = True
            self._state = _DONE
        elif marker == CALL_OPEN:
            self._end_segment()
            self._state = _CALL
        elif marker in (_LINE_CALL, _FRAGMENT_CALL):  # maybe a bare call: _try_bare_call decides
            if marker == _LINE_CALL:
                self._emit_text("\n", out, final=False)
            self._bare_shown = _BARE_CALL if marker == _LINE_CALL else marker
            self._buffer = _BARE_CALL + self._buffer
        elif self._state == _CONTENT and marker in (CHANNEL_OPEN, THINK_OPEN):
            self._end_segment()
            self._state, self._segment_start, self._reasoning_fresh = _REASONING, True, True
            self._reasoning_close = CHANNEL_CLOSE if marker == CHANNEL_OPEN else THINK_CLOSE
        elif self._state == _REASONING and marker == self._reasoning_close:
            self._end_segment()
            self._state = _CONTENT
        # anything else is a hidden token: dropped

    def _end_segment(self) -> None:
        """A thought or a call starts or a thought ends: whitespace around it is not shown."""
        if self._state == _REASONING:
            self._held_thought_space, self._lstrip_next = "", True
        else:
            self._marker_since_held = True

    def _emit_text(self, text: str, out: list[ChatDelta], final: bool) -> None:
        if not text:
            return
        if self._state == _REASONING:
            if self._reasoning_fresh:  # a thought segment starts at its first visible character
                text = text.lstrip()
                if not text:
                    return
                self._reasoning_fresh = False
            text = self._held_thought_space + text
            body = text.rstrip()
            self._held_thought_space = "" if final else text[len(body):]
            if body:
                out.append(ChatDelta(reasoning=body))
            return
        if self._lstrip_next:  # whitespace right after a thought or a call belongs to neither side
            text = text.lstrip()
            if not text:
                return
            self._lstrip_next = False
        # Trailing whitespace waits: it is shown when more content follows, or at the end unless a thought or
        # a call came after it (whitespace around them is not content). Leading whitespace of the answer stays.
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body):]
        if final and not self._marker_since_held:
            body, self._held_space = text, ""
        if body:
            self._content_started, self._marker_since_held = True, False
            out.append(ChatDelta(content=body))

    # ---- tool calls ----------------------------------------------------------------------------------------

    def _step_call(self, out: list[ChatDelta]) -> bool:
        ends = (CALL_CLOSE, *TURN_ENDS)
        found, at = _earliest(self._buffer, ends)
        if found is None:
            return False
        body, self._buffer = self._buffer[:at], self._buffer[at + len(found):]
        self._state = _CONTENT
        self._end_call(body, out, closed=found == CALL_CLOSE)
        if found in TURN_ENDS:
            self._state = _DONE
        return True

    def _end_call(self, body: str, out: list[ChatDelta], closed: bool) -> None:
        calls = _parse_calls(body)
        if calls is None:  # malformed: the user sees what the model wrote
            self._state = _CONTENT
            self._emit_text(CALL_OPEN + body + (CALL_CLOSE if closed else ""), out, final=False)
            return
        self._lstrip_next = True
        for name, arguments in calls:
            out.append(ChatDelta(tool_call=ToolCall(self._make_id(), name, json.dumps(arguments, ensure_ascii=False))))

    def _try_bare_call(self, out: list[ChatDelta], final: bool) -> bool | None:
        """A `call:NAME{...}` without its `<|tool_call>` (at the start of the answer or of a line, or after
        `<call>`). None: not one, go on as content; False: wait for more text; True: consumed."""
        text = self._buffer.lstrip()
        if not text:
            return None if final else False
        if len(text) < len(_BARE_CALL):
            return None if final or not _BARE_CALL.startswith(text) else False
        if not text.startswith(_BARE_CALL):
            return None
        name = _NAME.match(text, len(_BARE_CALL))
        if name is not None and text.startswith("{", name.end()) and self._tool_names is not None \
                and name.group() not in self._tool_names:
            return None  # not a declared tool: plain text, shown at once
        end = _call_end(text, len(_BARE_CALL))
        if end is None:
            if final:
                return None
            return False  # incomplete: hold until it closes (or the output ends)
        calls = _parse_calls(text[:end])
        if calls is None or (self._tool_names is not None and calls[0][0] not in self._tool_names):
            return None
        self._buffer = text[end:]
        self._end_segment()
        self._end_call(text[:end], out, closed=True)
        return True


# ---- text helpers --------------------------------------------------------------------------------------------


def _earliest(text: str, markers: Iterable[str]) -> tuple[str | None, int]:
    """The marker that occurs first in text (the longest where two start at the same place), and where."""
    best, best_at = None, len(text) + 1
    for marker in markers:
        at = text.find(marker)
        if at != -1 and (at < best_at or (at == best_at and len(marker) > len(best))):
            best, best_at = marker, at
    return best, best_at


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of text that is a proper beginning of some marker (held back)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if marker.startswith(text[-n:]):
                longest = n
                break
    return longest


def _call_end(text: str, i: int) -> int | None:
    """Index after the balanced `{...}` that follows `call:NAME` at i; None if it has not closed yet."""
    name = _NAME.match(text, i)
    if (name.end() if name else i) == len(text):
        return None  # the name may go on
    if name is None or not text.startswith("{", name.end()):
        return i  # not a call: the parser rejects text[:i] at once
    depth, j = 0, name.end()
    while j < len(text):
        if text.startswith(STRING_QUOTE, j):
            close = text.find(STRING_QUOTE, j + len(STRING_QUOTE))
            if close == -1:
                return None
            j = close + len(STRING_QUOTE)
            continue
        ch = text[j]
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


# ---- the Gemma argument syntax -------------------------------------------------------------------------------


class _Malformed(Exception):
    pass


def _parse_calls(body: str) -> list[tuple[str, dict]] | None:
    """`call:NAME{...}` once or more (whitespace around allowed), or None when it does not parse."""
    calls, i, body = [], 0, body.strip()
    if body.startswith(":" + _BARE_CALL):  # "<|tool_call>:call:..." is seen too
        i = 1
    try:
        while i < len(body):
            if not body.startswith(_BARE_CALL, i):
                raise _Malformed
            name = _NAME.match(body, i + len(_BARE_CALL))
            if name is None or not body.startswith("{", name.end()):
                raise _Malformed
            arguments, i = _ArgumentReader(body).object(name.end())
            calls.append((name.group(), arguments))
            while i < len(body) and body[i].isspace():
                i += 1
    except (_Malformed, IndexError, RecursionError):
        return None
    return calls or None


class _ArgumentReader:
    """Reads Gemma's argument syntax: `{key:value,...}` with bare (or quoted) keys, strings in `<|"|>`,
    bare numbers, true/false/null, nested objects and lists. Also takes JSON-quoted strings and keys."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i].isspace():
            i += 1
        return i

    def _items(self, i: int, close: str, read_item: Callable[[int], int]) -> int:
        """From the opening bracket at i: `item (, item)* close` or just `close`; `read_item(i)` reads one item
        and returns where it ends. Returns the index past `close`."""
        i = self._skip(i + 1)
        if self.text.startswith(close, i):
            return i + 1
        while True:
            i = self._skip(read_item(self._skip(i)))
            if self.text.startswith(",", i):
                i += 1
            elif self.text.startswith(close, i):
                return i + 1
            else:
                raise _Malformed

    def object(self, i: int) -> tuple[dict, int]:
        result: dict = {}

        def entry(i: int) -> int:
            key, i = self._key(i)
            i = self._skip(i)
            if not self.text.startswith(":", i):
                raise _Malformed
            result[key], i = self.value(self._skip(i + 1))
            return i

        end = self._items(i, "}", entry)
        return result, end

    def _key(self, i: int) -> tuple[str, int]:
        if self.text.startswith(STRING_QUOTE, i) or self.text.startswith('"', i):
            key, i = self.value(i)
            return key, i
        end = i
        while end < len(self.text) and self.text[end] not in ':{}[],"' and not self.text[end].isspace():
            end += 1
        if end == i:
            raise _Malformed
        return self.text[i:end], end

    def value(self, i: int):
        text = self.text
        if text.startswith(STRING_QUOTE, i):
            close = text.find(STRING_QUOTE, i + len(STRING_QUOTE))
            if close == -1:
                raise _Malformed
            return text[i + len(STRING_QUOTE): close], close + len(STRING_QUOTE)
        if text.startswith('"', i):
            try:
                value, end = _JSON.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise _Malformed from e
            return value, end
        if text.startswith("{", i):
            return self.object(i)
        if text.startswith("[", i):
            return self._list(i)
        end = i
        while end < len(text) and text[end] not in ",}]":
            end += 1
        return _scalar(text[i:end].strip()), end

    def _list(self, i: int) -> tuple[list, int]:
        items: list = []

        def item(i: int) -> int:
            value, i = self.value(i)
            items.append(value)
            return i

        end = self._items(i, "]", item)
        return items, end


def _scalar(raw: str):
    """A bare value: true/false/null, a number, or else the text itself (the model left a string unquoted)."""
    if not raw:
        raise _Malformed
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if _NUMBER.fullmatch(raw):
        number = float(raw)
        if re.fullmatch(r"-?\d+", raw):
            return int(raw)
        # 1e999 overflows to inf, which json.dumps writes as Infinity (not JSON): keep such a number's text
        return number if math.isfinite(number) else raw
    return raw
