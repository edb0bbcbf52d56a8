"""A regex compiled to a token automaton over a tokenizer's vocabulary (outlines-core), as tensors for the DP.

outlines-core builds the byte-level DFA of the regex and walks every token's bytes through it, giving a
token-level DFA: state -> {token id: next state}. That is exactly what dynamic programming over (position,
state) needs (dp.py); libraries that only answer "which tokens may come next" (xgrammar, llguidance) would
have to be explored state by state first (BENCHMARKS.md, "Structured output", says why we chose this one).

Tokens: each id is spelled by the bytes it decodes to (byte-level BPE: its byte map; SentencePiece style:
"▁" as a space, `<0xHH>` as a byte). Special tokens are left out (their text is dropped when decoding for
users), except the ones a caller allows by name (the Gemma chat format's markers, for tool calls), which are
spelled by their text. EOS ids are never in the automaton: the DP ends the answer with one (dp.py).

Shapes: S states (0 = the start), E edges (src, token, dst) sorted by (src, token) with per-state offsets, each
state's shortest distance to an accepting state in tokens (`distance`, for "can this prefix still complete
within the token budget"). Nothing is kept per edge but the three int32 tensors (12 bytes an edge): at the
released 262,144-token vocabulary json_object has ~4.8 M edges, 55 MB (BENCHMARKS.md, "Structured output").
"""

from __future__ import annotations

import re
import threading
import zlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch

from ..tokenizer import Tokenizer
from .regex import SchemaError, narrow
from .size import MAX_EDGES, FirstChars, check_size

INFINITE = 2**30
_CACHE_SIZE = 64  # compiled automata kept (least recently used out first), and at most this many edges in all:
_CACHE_EDGES = 2 * MAX_EDGES  # 64 M at the default: ~770 MB
# outlines-core's Index also determinizes the *unanchored* search DFA of the regex (".*regex"), which blows
# up exponentially for a literal followed by a bounded repeat that can contain it (`1[1-9]{20}`: 13 s, one
# state per subset of the last 20 positions). We compile SENTINEL + regex instead, with SENTINEL removed
# from every class that could match it, so a new match can only start at a SENTINEL and each subset holds
# one state of one match: linear size. The automaton then starts after a fake token spelling SENTINEL.
SENTINEL = "\U0010fffd"  # a private-use character no tokenizer we know of writes
_SENTINEL_ID = 2**31 - 2  # a token id no vocabulary uses


@dataclass
class TokenAutomaton:
    """Edges sorted by (src, token): state s's edges are [offsets[s], offsets[s + 1]), its tokens ascending, so
    a committed token is found by binary search in its state's slice. No Python object per edge or per
    (state, token): 12 bytes per edge on the CPU (int32 src, token, dst; BENCHMARKS.md, "Structured output")."""

    regex: str
    num_states: int
    src: torch.Tensor  # [E] int32
    token: torch.Tensor  # [E] int32
    dst: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [S + 1] long
    accepting: torch.Tensor  # [S] bool
    distance: torch.Tensor  # [S] long: fewest tokens to an accepting state (INFINITE: never)
    _copies: dict = field(default_factory=dict, repr=False)  # device -> this automaton's tensors there
    _bounds: list[int] | None = field(default=None, repr=False)  # offsets as Python ints (S + 1 of them)
    _views: tuple | None = field(default=None, repr=False)  # memoryviews of token and dst, for bisect

    def _slice(self, state: int) -> tuple[int, int]:
        if self._bounds is None:
            self._bounds = self.offsets.tolist()
        return self._bounds[state], self._bounds[state + 1]

    def allowed(self, state: int) -> torch.Tensor:
        """The tokens state `state` may write next ([n], ascending, where the tensors live)."""
        lo, hi = self._slice(state)
        return self.token[lo:hi]

    def next_state(self, state: int, token: int) -> int | None:
        """The state after writing `token` in `state`; None when the token is not allowed there (a binary
        search in the state's slice of `token`; CPU automata, as compile_regex returns them)."""
        lo, hi = self._slice(state)
        if self._views is None:
            self._views = memoryview(self.token.numpy()), memoryview(self.dst.numpy())
        tokens, dst = self._views
        i = bisect_left(tokens, token, lo, hi)
        return dst[i] if i < hi and tokens[i] == token else None

    def walk(self, state: int, tokens: list[int]) -> int | None:
        """The state after `tokens` from `state`; None when a token is not allowed."""
        for t in tokens:
            state = self.next_state(state, t)
            if state is None:
                return None
        return state

    def to(self, device: torch.device | str) -> "TokenAutomaton":
        """The tensors on `device` (copied once per device; this object itself stays on the CPU). Off the CPU
        the edge tensors become long: the DP's int32 gather/scatter indices are only checked on the CPU."""
        device = torch.device(device)
        if self.src.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = TokenAutomaton(
                self.regex, self.num_states, self.src.to(device, torch.long), self.token.to(device, torch.long),
                self.dst.to(device, torch.long), self.offsets.to(device), self.accepting.to(device),
                self.distance.to(device))
        return self._copies[device]


def special_char(token: str) -> str:
    """The private-use character an allowed special token is spelled as in a constraint. Spelled as its text,
    `<|tool_call>` was one token that any regex admitting "<", "|" and letters admitted: inside every JSON
    string of a chat's response_format, where the chat parser then read it as a marker (half the JSON came back
    as reasoning). As its own character it is allowed only where the regex writes the marker (mark_specials),
    and `narrow` keeps it out of `.` and negated classes."""
    return chr(0xF0000 + zlib.crc32(token.encode()) % 0xFFFE)


def mark_specials(regex: str, allowed_special: frozenset[str]) -> str:
    """`regex` with each allowed special token written literally (escaped, as re.escape writes it) replaced by
    its special_char."""
    for token in sorted(allowed_special, key=len, reverse=True):
        regex = regex.replace(re.escape(token), special_char(token))
    return regex


def token_bytes(tokenizer: Tokenizer, allowed_special: frozenset[str] = frozenset()) -> dict[bytes, list[int]]:
    """bytes -> the ids spelling them: every token but the special ones (except `allowed_special`)."""
    backend = tokenizer._backend
    vocab = backend.get_vocab(with_added_tokens=True)
    special = tokenizer.special_ids()
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    decoder = backend.decoder
    kind = type(decoder).__name__ if decoder is not None else ""
    byte_map = _byte_level_map() if kind == "ByteLevel" else None
    out: dict[bytes, list[int]] = {}
    for token, i in vocab.items():
        if i in added:
            if added[i] not in allowed_special and (i in special or not added[i]):
                continue
            spelled = (special_char(added[i]) if added[i] in allowed_special else added[i]).encode()
        elif byte_map is not None:
            try:
                spelled = bytes(byte_map[c] for c in token)
            except KeyError:
                spelled = backend.decode([i], skip_special_tokens=False).encode()
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            spelled = bytes([int(token[3:5], 16)])
        elif "\u2581" in token:
            spelled = token.replace("\u2581", " ").encode()
        else:
            spelled = backend.decode([i], skip_special_tokens=False).encode()
        if i in special and token not in allowed_special:
            continue
        if spelled and SENTINEL.encode() not in spelled:
            out.setdefault(spelled, []).append(i)
    return out


def _byte_level_map() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def compile_regex(regex: str, tokenizer: Tokenizer, eos_token_ids: list[int],
                  allowed_special: frozenset[str] = frozenset(), limit: int = MAX_EDGES) -> TokenAutomaton:
    """The token automaton of `regex` (cached per tokenizer, regex and allowed specials). SchemaError when
    the regex is invalid, matches nothing, or would compile to more than `limit` edges (size.py): that is
    checked before outlines-core, which has no limit of its own, starts."""
    key = (id(tokenizer), regex, tuple(sorted(eos_token_ids)), allowed_special)
    while True:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit
            running = _compiling.get(key)
            if running is None:  # ours to compile; the same constraint arriving meanwhile waits for it
                running = _compiling[key] = threading.Event()
                break
        running.wait()  # then look again (a failed compile leaves no entry: that caller raises its own error)
    try:
        eos = eos_token_ids[0] if eos_token_ids else tokenizer.vocab_size  # outlines needs one; never emitted
        spelled, first = _vocabulary(tokenizer, eos, allowed_special)
        # markers this tokenizer has as single tokens; others are written in ordinary tokens, as text
        present = allowed_special & {t.content for t in tokenizer._backend.get_added_tokens_decoder().values()}
        marked = mark_specials(regex, present)
        check_size(marked, first, limit)
        excluded = SENTINEL + "".join(special_char(t) for t in sorted(present))
        anchored = SENTINEL + f"(?:{narrow(marked, excluded)})"
        table = _byte_classes(anchored, first.total, limit)
        automaton = _compile(regex, anchored, _grouped(spelled, table, eos), eos_token_ids)
        with _lock:
            _cache[key] = automaton
            while len(_cache) > 1 and (len(_cache) > _CACHE_SIZE or
                                       sum(a.src.numel() for a in _cache.values()) > _CACHE_EDGES):
                _cache.popitem(last=False)
        return automaton
    finally:
        with _lock:
            del _compiling[key]
        running.set()


_cache: OrderedDict = OrderedDict()
_compiling: dict = {}  # key -> Event set when its compile ends (agents send the same schema in bursts)
_lock = threading.Lock()
_vocabularies: dict = {}


def _vocabulary(tokenizer: Tokenizer, eos: int, allowed_special: frozenset[str]) -> tuple[dict, FirstChars]:
    """The tokens' spellings (bytes -> ids, see token_bytes), and how many tokens start with each character
    (for size.py). `eos` is part of the key only (outlines' Vocabulary is built per constraint: _grouped)."""
    key = (id(tokenizer), eos, allowed_special)
    with _lock:
        if key not in _vocabularies:
            spelled = token_bytes(tokenizer, allowed_special)
            _vocabularies[key] = spelled, FirstChars(spelled)
        return _vocabularies[key]


# Scans: outlines-core's Index walks every token of the vocabulary from every state of the regex's DFA, so it
# costs states x tokens whatever the edges. A regex that determinizes into many states (`[ab]*a[ab]{20}`:
# 2**21) passes the edge estimate; it is refused when states x tokens passes SCANS_PER_EDGE x the edge limit
# (2 x 10**9 at the default: json_object at 262,144 tokens is 711 x 262,144 = 1.9 x 10**8).
SCANS_PER_EDGE = 64


def _index_error(anchored: str, error: Exception) -> SchemaError:
    """outlines-core says only "Failed to build DFA" for a regex with a syntax error; Python's parser names the
    fault (its syntax is close enough to find one; a regex it alone rejects keeps outlines-core's words)."""
    import re

    try:
        re.compile(anchored)
    except re.error as syntax:
        return SchemaError(f"the regex is not valid: {syntax.msg}")  # its position counts our anchoring too
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return SchemaError(f"the constraint cannot be compiled for this model's vocabulary: {message}")


def _byte_classes(anchored: str, tokens: int, limit: int) -> bytes:
    """A translation table sending every byte to the first byte of its class: bytes that outlines-core's
    Index of `anchored` over the 256 one-byte tokens moves alike from every state it reaches. Every DFA
    state a token's walk passes through (that can still lead anywhere) is one of those states, so a token
    behaves exactly like any other token whose bytes are in the same classes: the full Index need walk one
    token of each spelling-by-classes (a 262,144-token vocabulary has about half as many; 2-3x faster).
    Also refuses the constraint when the DFA has too many states for the vocabulary (see SCANS_PER_EDGE);
    this one-byte Index costs states x 256, against the full one's states x tokens."""
    from outlines_core import Index

    try:
        index = Index(anchored, _byte_vocabulary())
    except (ValueError, RuntimeError) as e:
        raise _index_error(anchored, e) from None
    moves = index.get_transitions()  # {state: {byte: state}}: at most 256 entries per state
    states = len(moves.keys() | set(index.get_final_states()))
    if states * tokens > SCANS_PER_EDGE * limit:
        raise SchemaError(f"the constraint is too large to compile: its automaton has {states:,} states, and "
                          f"{states:,} x {tokens:,} tokens is more than this server walks (at most {SCANS_PER_EDGE} "
                          f"x {limit:,}); a bounded repeat after an unbounded one that can match the same "
                          "characters ([ab]*a[ab]{20}) multiplies states: bound the first or shorten the second "
                          "(a server may raise the limit: --max-constraint-edges)")
    rows = list(moves.values())
    classes = torch.zeros(256, dtype=torch.long)  # refined chunk by chunk: bytes split by where states send them
    for i in range(0, len(rows), 1024):
        chunk = rows[i: i + 1024]
        targets = torch.full((len(chunk) + 1, 257), -1, dtype=torch.long)  # [1 + states, byte, EOS]: -1 = dead
        targets[0, :256] = classes
        lengths = torch.tensor([len(row) for row in chunk], dtype=torch.long)
        which = torch.repeat_interleave(torch.arange(1, len(chunk) + 1), lengths)
        targets[which, torch.tensor([b for row in chunk for b in row], dtype=torch.long)] = torch.tensor(
            [d for row in chunk for d in row.values()], dtype=torch.long)
        classes = torch.unique(targets[:, :256], dim=1, return_inverse=True)[1]
    first = torch.full((256,), 256, dtype=torch.long).scatter_reduce(0, classes, torch.arange(256), "amin")
    return bytes(first[classes].tolist())  # each byte -> the first byte of its class


def _byte_vocabulary():
    from outlines_core import Vocabulary

    global _BYTES
    if _BYTES is None:
        _BYTES = Vocabulary(256, {bytes([b]): [b] for b in range(256)})
    return _BYTES


_BYTES = None


def _grouped(spelled: dict[bytes, list[int]], table: bytes, eos: int):
    """outlines-core's Vocabulary of one spelling per class sequence (see _byte_classes), each with the ids
    of all the tokens spelled so, and the sentinel."""
    from outlines_core import Vocabulary

    grouped: dict[bytes, list[int]] = {}
    for spelling, ids in spelled.items():
        key = spelling.translate(table)
        same = grouped.get(key)
        if same is None:
            grouped[key] = list(ids)
        else:
            same.extend(ids)
    grouped.setdefault(SENTINEL.encode(), []).append(_SENTINEL_ID)
    return Vocabulary(eos, grouped)


def _compile(regex: str, anchored: str, vocabulary, eos_token_ids: list[int]) -> TokenAutomaton:
    from outlines_core import Index

    try:
        index = Index(anchored, vocabulary)
    except (ValueError, RuntimeError) as e:
        raise _index_error(anchored, e) from None
    start = index.get_next_state(index.get_initial_state(), _SENTINEL_ID)
    if start is None:
        raise SchemaError("no text this model's tokenizer can write matches the constraint")
    skip = sorted(set(eos_token_ids) | {vocabulary.get_eos_token_id(), _SENTINEL_ID})  # never edges
    # Breadth first from `start` (our state numbers are the visit order, successors in outlines' order), one
    # state at a time and with no Python object kept per edge: outlines' get_transitions() would build a dict
    # entry per edge (~100 bytes) at once. Per edge only C-level steps here; the sort is in chunks below.
    number = {start: 0}
    order = [start]
    tokens, targets, counts = array("i"), array("i"), array("q")
    for s in order:
        allowed = index.get_allowed_tokens(s)
        for t in skip:  # outlines lets an accepting state write its EOS
            if t in allowed:
                allowed.remove(t)
        moves = list(map(partial(index.get_next_state, s), allowed))  # outlines' state ids
        for d in dict.fromkeys(moves):  # first occurrences, in order: a Python step per distinct successor
            if d not in number:
                number[d] = len(order)
                order.append(d)
        tokens.extend(allowed)
        targets.extend(map(number.__getitem__, moves))
        counts.append(len(allowed))
    num_states = len(order)
    token, dst, pairs = _sort_edges(_tensor(tokens, torch.int32), _tensor(targets, torch.int32), counts)
    del tokens, targets
    per_state = _tensor(counts, torch.long)
    src = torch.repeat_interleave(torch.arange(num_states, dtype=torch.int32), per_state)
    offsets = torch.zeros(num_states + 1, dtype=torch.long)
    offsets[1:] = per_state.cumsum(0)
    accepting = torch.zeros(num_states, dtype=torch.bool)
    accepting[[number[s] for s in index.get_final_states() if s in number]] = True
    distance = _distance_to_accept(pairs, accepting)
    if distance[0] >= INFINITE:
        raise SchemaError("no text this model's tokenizer can write matches the constraint")
    return TokenAutomaton(regex, num_states, src, token, dst, offsets, accepting, distance)


_SORT_CHUNK = 2**20  # edges sorted at a time (a state's edges are never split): ~40 MB of temporaries


def _sort_edges(token: torch.Tensor, dst: torch.Tensor, counts: array) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Each state's edges (consecutive, `counts` of them per state) sorted by token, a chunk of states at a
    time so that the temporaries do not grow with E; and the distinct (state, next state) pairs."""
    token_out, dst_out = torch.empty_like(token), torch.empty_like(dst)
    pairs: list[tuple[int, int]] = []
    first, lo = 0, 0
    while first < len(counts):
        last, hi = first, lo
        while last < len(counts) and (last == first or hi + counts[last] - lo <= _SORT_CHUNK):
            hi += counts[last]
            last += 1
        local = torch.repeat_interleave(torch.arange(last - first), _tensor(counts[first:last], torch.long))
        by_token = torch.argsort((local << 31) | token[lo:hi].long())  # token ids < 2**31
        token_out[lo:hi], dst_out[lo:hi] = token[lo:hi][by_token], dst[lo:hi][by_token]
        chunk_pairs = torch.unique((local << 32) | dst_out[lo:hi].long())
        pairs += zip(((chunk_pairs >> 32) + first).tolist(), (chunk_pairs & (2**32 - 1)).tolist())
        first, lo = last, hi
    return token_out, dst_out, pairs


def _tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over an array's buffer (an empty one for an empty array)."""
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.zeros(0, dtype=dtype)




def _distance_to_accept(pairs: list[tuple[int, int]], accepting: torch.Tensor) -> torch.Tensor:
    """Breadth-first search backwards from the accepting states, over the distinct (state, next state) pairs
    (a few per state, however many tokens each has)."""
    num_states = accepting.numel()
    incoming: list[list[int]] = [[] for _ in range(num_states)]
    for s, d in pairs:
        incoming[d].append(s)
    distance = [INFINITE] * num_states
    frontier = accepting.nonzero().flatten().tolist()
    for s in frontier:
        distance[s] = 0
    while frontier:
        nxt = []
        for d in frontier:
            for s in incoming[d]:
                if distance[s] == INFINITE:
                    distance[s] = distance[d] + 1
                    nxt.append(s)
        frontier = nxt
    return torch.tensor(distance, dtype=torch.long)
