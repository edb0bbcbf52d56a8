"""How large a regex's token automaton would be, estimated before compiling it, so that one request cannot
take the server's memory: outlines-core has no time or memory limit, and the token-level DFA holds one edge
per (state, token that can start there). A regex with nested bounded repeats multiplies its states
(`(?:(?:[a-z]{0,100},){0,100};){0,30}` has ~300,000 positions: 5 x 10**8 edges at a 4,096-token vocabulary),
and a larger vocabulary multiplies the edges again (a state inside a JSON string has an edge for nearly every
token).

The estimate walks Python's parse of the regex: every character position, unrolled through its bounded
repeats (an unbounded repeat counts its body min+1 times), weighted by how many tokens of the vocabulary
begin with a character that position matches. That is the number of edges leaving the positions' states,
which is what the automaton's memory and compile time grow with. It is an estimate, not a bound: a DFA can
also grow by determinizing (`.*a.{20}`), which the anchored compile (automaton.py) mostly avoids and its
state count check (automaton._byte_classes) refuses. Regex
syntax that Python cannot parse (outlines-core takes Rust's) falls back to a cruder, larger estimate.
"""

from __future__ import annotations

import re
from collections import Counter

try:  # Python 3.11+
    from re import _constants as sre, _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre
    import sre_parse

from .regex import MAX_REGEX_CHARS, SchemaError

# The most (estimated) automaton edges a request may compile. An edge costs 12 bytes resident, ~40 bytes at the
# compile's peak and ~5 us of compile on the 2-core sandbox (outlines-core's Index most of it); the limit is set
# so that json_object and the schema suite of benchmarks/structured.py compile at the released vocabulary
# (262,144 tokens: estimates up to 17.8 M; BENCHMARKS.md, "Structured output"): at most ~380 MB resident.
MAX_EDGES = 32_000_000
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


class FirstChars:
    """How many tokens begin with each character (bytes that are not UTF-8 text count for every class)."""

    def __init__(self, spelled: dict[bytes, list[int]]):
        self.counts: Counter[str] = Counter()
        self.undecodable = 0
        for spelling, ids in spelled.items():
            try:
                first = spelling.decode("utf-8")[:1]
            except UnicodeDecodeError:
                self.undecodable += len(ids)
                continue
            self.counts[first] += len(ids)
        self.total = sum(self.counts.values()) + self.undecodable
        self._memo: dict = {}

    def matching(self, op, av) -> int:
        """Tokens whose first character the leaf (op, av) of a parsed regex matches."""
        key = (op, repr(av))
        if key not in self._memo:
            if op is sre.LITERAL:
                n = self.counts.get(chr(av), 0)
            elif op is sre.NOT_LITERAL:
                n = self.total - self.counts.get(chr(av), 0)
            elif op is sre.ANY:
                n = self.total
            else:  # IN: a class
                n = sum(c for ch, c in self.counts.items() if _in_class(av, ch)) + self.undecodable
            self._memo[key] = n
        return self._memo[key]


def estimate_edges(regex: str, first: FirstChars) -> int:
    """The estimated edge count of `regex`'s token automaton (see the module docstring)."""
    if len(regex) > MAX_REGEX_CHARS:
        return MAX_EDGES + 1
    try:
        parsed = sre_parse.parse(regex)
    except (re.error, OverflowError, RecursionError):
        return _crude(regex, first)
    try:
        return _walk(parsed, first)
    except RecursionError:
        return MAX_EDGES + 1


def check_size(regex: str, first: FirstChars, limit: int = MAX_EDGES) -> int:
    """Raise SchemaError when `regex` would compile to more than `limit` estimated edges."""
    if len(regex) > MAX_REGEX_CHARS:
        raise SchemaError(f"the constraint is too large: its regex has {len(regex):,} characters (at most "
                          f"{MAX_REGEX_CHARS:,}); use fewer or smaller bounded repeats (maxLength, maxItems, "
                          "{m,n}) or fewer alternatives")
    edges = estimate_edges(regex, first)
    if edges > limit:
        raise SchemaError(f"the constraint is too large to compile: about {edges:,} automaton transitions over "
                          f"this model's vocabulary (at most {limit:,}); nested bounded repeats multiply (a "
                          "maxItems of objects with maxLength strings, {m,n} inside {m,n}): lower the bounds "
                          "or leave the inner ones unbounded (a server may raise the limit: --max-constraint-edges)")
    return edges


def _walk(pattern, first: FirstChars) -> int:
    total = 0
    for op, av in pattern:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            total += first.matching(op, av)
        elif op is sre.SUBPATTERN:
            total += _walk(av[-1], first)
        elif op is sre.BRANCH:
            total += sum(_walk(p, first) for p in av[1])
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT) or op is getattr(sre, "POSSESSIVE_REPEAT", None):
            low, high, body = av
            times = low + 1 if high is sre.MAXREPEAT else max(high, 1)
            total += times * _walk(body, first)
        elif op is getattr(sre, "ATOMIC_GROUP", None) or op in (sre.ASSERT, sre.ASSERT_NOT):
            total += _walk(av if op is not sre.ASSERT and op is not sre.ASSERT_NOT else av[1], first)
        # AT (anchors), GROUPREF and the rest add no positions
        if total > MAX_EDGES * 1000:  # far past any limit: stop multiplying
            return total
    return total


def _crude(regex: str, first: FirstChars) -> int:
    """Every character a position matching any token, every bounded repeat nested in every other."""
    times = 1
    for low, high in _REPEAT.findall(regex):
        times *= max(int(high) if high else int(low) + 1, 1)
        if times > MAX_EDGES:
            break
    return len(regex) * times * first.total


def _in_class(items, ch: str) -> bool:
    """Whether the parsed character class `items` matches `ch`."""
    code = ord(ch)
    negate = False
    hit = False
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            hit = hit or code == av
        elif op is sre.RANGE:
            hit = hit or av[0] <= code <= av[1]
        elif op is sre.CATEGORY:
            hit = hit or _CATEGORIES.get(av, lambda c: True)(ch)
        else:  # anything else: assume it matches (an overestimate)
            hit = True
    return hit != negate


_CATEGORIES = {
    sre.CATEGORY_DIGIT: str.isdigit, sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre.CATEGORY_SPACE: str.isspace, sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_", sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}
