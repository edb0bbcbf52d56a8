"""A regex compiled to a token automaton over a tokenizer's vocabulary (outlines-core), as tensors for the DP.

outlines-core builds the byte-level DFA of the regex and walks every token's bytes through it, giving a
token-level DFA: state -> {token id: next state}. That is exactly what dynamic programming over (position,
state) needs (dp.py); libraries that only answer "which tokens may come next" (xgrammar, llguidance) would
have to be explored state by state first (BENCHMARKS.md, "Structured output", says why we chose this one).

Tokens: each id is spelled by the bytes it decodes to (byte-level BPE: its byte map; SentencePiece style:
"▁" as a space, `<0xHH>` as a byte). Special tokens are left out (their text is dropped when decoding for
users), except the ones a caller allows by name (the Gemma chat format's markers, for tool calls), which are
spelled by their text. EOS ids are never in the automaton: the DP ends the answer with one (dp.py).

Shapes: S states (0 = the start), E edges (src, token, dst), each state's shortest distance to an accepting
state in tokens (`distance`, for "can this prefix still complete within the token budget").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..tokenizer import Tokenizer
from .regex import SchemaError, narrow
from .size import MAX_EDGES, FirstChars, check_size

INFINITE = 2**30
_CACHE_SIZE = 64  # compiled automata kept (least recently used out first), and at most this many edges in all:
_CACHE_EDGES = 2 * MAX_EDGES
# outlines-core's Index also determinizes the *unanchored* search DFA of the regex (".*regex"), which blows
# up exponentially for a literal followed by a bounded repeat that can contain it (`1[1-9]{20}`: 13 s, one
# state per subset of the last 20 positions). We compile SENTINEL + regex instead, with SENTINEL removed
# from every class that could match it, so a new match can only start at a SENTINEL and each subset holds
# one state of one match: linear size. The automaton then starts after a fake token spelling SENTINEL.
SENTINEL = "\U0010fffd"  # a private-use character no tokenizer we know of writes
_SENTINEL_ID = 2**31 - 2  # a token id no vocabulary uses


@dataclass
class TokenAutomaton:
    regex: str
    num_states: int
    src: torch.Tensor  # [E] long
    token: torch.Tensor  # [E] long
    dst: torch.Tensor  # [E] long
    accepting: torch.Tensor  # [S] bool
    distance: torch.Tensor  # [S] long: fewest tokens to an accepting state (INFINITE: never)
    transitions: list[dict[int, int]]  # per state, for walking committed tokens
    _copies: dict = field(default_factory=dict, repr=False)  # device -> this automaton's tensors there
    _offsets: list[int] | None = field(default=None, repr=False)  # state s's edges: [offsets[s], offsets[s + 1])

    def allowed(self, state: int) -> torch.Tensor:
        """The tokens state `state` may write next ([n] long, where the tensors live; edges are sorted by src)."""
        if self._offsets is None:
            counts = torch.bincount(self.src, minlength=self.num_states).cumsum(0)
            self._offsets = [0] + counts.tolist()
        return self.token[self._offsets[state]: self._offsets[state + 1]]

    def walk(self, state: int, tokens: list[int]) -> int | None:
        """The state after `tokens` from `state`; None when a token is not allowed."""
        for t in tokens:
            state = self.transitions[state].get(t)
            if state is None:
                return None
        return state

    def to(self, device: torch.device | str) -> "TokenAutomaton":
        """The tensors on `device` (copied once per device; this object itself stays on the CPU)."""
        device = torch.device(device)
        if self.src.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = TokenAutomaton(
                self.regex, self.num_states, self.src.to(device), self.token.to(device), self.dst.to(device),
                self.accepting.to(device), self.distance.to(device), self.transitions)
        return self._copies[device]


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
            spelled = added[i].encode()
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
        vocabulary, first = _vocabulary(tokenizer, eos, allowed_special)
        check_size(regex, first, limit)
        automaton = _compile(regex, vocabulary, eos_token_ids)
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


def _vocabulary(tokenizer: Tokenizer, eos: int, allowed_special: frozenset[str]) -> tuple[object, FirstChars]:
    """outlines-core's Vocabulary, and how many tokens start with each character (for size.py)."""
    from outlines_core import Vocabulary

    key = (id(tokenizer), eos, allowed_special)
    with _lock:
        if key not in _vocabularies:
            spelled = token_bytes(tokenizer, allowed_special)
            first = FirstChars(spelled)
            spelled[SENTINEL.encode()] = [_SENTINEL_ID]
            _vocabularies[key] = Vocabulary(eos, spelled), first
        return _vocabularies[key]


def _compile(regex: str, vocabulary, eos_token_ids: list[int]) -> TokenAutomaton:
    from outlines_core import Index

    try:
        index = Index(SENTINEL + f"(?:{narrow(regex, SENTINEL)})", vocabulary)
    except (ValueError, RuntimeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SchemaError(f"the constraint cannot be compiled for this model's vocabulary: {message}") from None
    raw = index.get_transitions()
    final = set(index.get_final_states())
    start = raw.get(index.get_initial_state(), {}).get(_SENTINEL_ID)
    if start is None:
        raise SchemaError("no text this model's tokenizer can write matches the constraint")
    order = _reachable(raw, start)
    number = {s: n for n, s in enumerate(order)}
    skip = set(eos_token_ids)
    transitions: list[dict[int, int]] = [dict() for _ in order]
    skip.add(_SENTINEL_ID)
    for s in order:
        for token, d in raw.get(s, {}).items():
            if token not in skip:
                transitions[number[s]][token] = number[d]
    edges = [(s, t, d) for s, moves in enumerate(transitions) for t, d in moves.items()]
    accepting = torch.zeros(len(order), dtype=torch.bool)
    accepting[[number[s] for s in final if s in number]] = True
    distance = _distance_to_accept(transitions, accepting)
    if distance[0] >= INFINITE:
        raise SchemaError("no text this model's tokenizer can write matches the constraint")
    e = torch.tensor(edges, dtype=torch.long).reshape(-1, 3)
    return TokenAutomaton(regex, len(order), e[:, 0].contiguous(), e[:, 1].contiguous(), e[:, 2].contiguous(),
                          accepting, distance, transitions)


def _reachable(raw: dict[int, dict[int, int]], start: int) -> list[int]:
    """The states reachable from `start`, `start` first."""
    order, seen = [start], {start}
    for s in order:
        for d in raw.get(s, {}).values():
            if d not in seen:
                seen.add(d)
                order.append(d)
    return order


def _distance_to_accept(transitions: list[dict[int, int]], accepting: torch.Tensor) -> torch.Tensor:
    """Breadth-first search backwards from the accepting states."""
    incoming: list[set[int]] = [set() for _ in transitions]
    for s, moves in enumerate(transitions):
        for d in moves.values():
            incoming[d].add(s)
    distance = [INFINITE] * len(transitions)
    frontier = [s for s in range(len(transitions)) if accepting[s]]
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
