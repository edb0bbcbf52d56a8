"""The Sudoku rule mask and its backtracking search, for decoding a model's digit proposals (`--rule-mask`).

The idea is constrained decoding, as for structured output: before the entropy-ordered acceptance of a step,
every proposal the rules forbid is masked out. A cell may only take a digit that clashes with no given and no
accepted cell in its row, column and box (and that the search has not ruled out, below). The model's
distribution over the allowed digits is renormalised; cells are ranked by its entropy and accepted as the
engine's entropy bound does (the longest lowest-entropy prefix with sum - max <= bound, at least one cell).
Within one step a proposal that clashes with a cell accepted before it in the same step waits for the next
step. A cell with one allowed digit has entropy 0, so the mask alone fills the "naked singles".

Accepted cells stay accepted (they are pinned into the next canvas, as the givens are), so a wrong acceptance
can lead to a dead end: a blank cell with no allowed digit, or a digit that has no allowed cell left in some
row, column or box. The search then backtracks: it re-noises the latest acceptance and bans that digit in that
cell in the state before it. Acceptances are kept one by one in the order they were made (a step's surest
first), and an acceptance that itself makes a dead end is banned at once and ends the step's list. A ban holds
only in the state it was made in and goes when the search backtracks past it. So this is depth-first search,
sound (a ban is only ever a proven impossibility) and complete, in the order the model is surest of, within a
budget of model forwards; the checks cost no forward. A finished board is valid by construction.

Pure Python on bit masks (bit d set = digit d, 1-9): the state of one puzzle is 81 ints. Nothing here knows
about the model; `apps/sudoku_solve.py` feeds it log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .sudoku import BOX_OF, UNITS

ALL = 0b1111111110  # digits 1-9 as bits 1-9


def bits(mask: int) -> list[int]:
    """The digits whose bits are set, ascending."""
    return [d for d in range(1, 10) if mask >> d & 1]


def allowed_digits(board: list[int], banned: list[int] | None = None) -> list[int]:
    """Per cell, the digits (bit mask) it may take: 0 for a filled cell; for a blank one, the digits used by
    none of its peers (and not in `banned[cell]`)."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(board):
        if v:
            rows[i // 9] |= 1 << v
            cols[i % 9] |= 1 << v
            boxes[BOX_OF[i]] |= 1 << v
    return [0 if v else ALL & ~(rows[i // 9] | cols[i % 9] | boxes[BOX_OF[i]] | (banned[i] if banned else 0))
            for i, v in enumerate(board)]


def dead_end(board: list[int], allowed: list[int]) -> bool:
    """No completion of `board` exists within `allowed`: a digit twice in a unit, a blank cell with no allowed
    digit, or a digit missing from a unit and allowed in none of its blank cells."""
    for unit in UNITS:
        placed, reachable = 0, 0
        for i in unit:
            v = board[i]
            if v:
                if placed >> v & 1:
                    return True
                placed |= 1 << v
            elif not allowed[i]:
                return True
            else:
                reachable |= allowed[i]
        if (placed | reachable) != ALL:
            return True
    return False


@dataclass
class RuleSearch:
    """One puzzle's accepted cells, bans and backtracking stack. `board[i]` is 0 for a cell not yet accepted."""

    puzzle: str
    board: list[int] = field(init=False)
    accepted: list[tuple[int, int]] = field(init=False, default_factory=list)  # (cell, digit), in order
    bans: list[set[tuple[int, int]]] = field(init=False)  # bans[k]: ruled out after k acceptances
    failed: bool = field(init=False, default=False)  # the search space is exhausted (or the givens clash)
    backtracks: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.board = [int(ch) for ch in self.puzzle]
        self.bans = [set()]
        self.settle()

    # ------------------------------------------------------------------------------------------------ state
    @property
    def solved(self) -> bool:
        return not self.failed and all(self.board)

    @property
    def done(self) -> bool:
        return self.failed or self.solved

    def text(self) -> str:
        return "".join(map(str, self.board))

    def allowed(self) -> list[int]:
        """Per cell, the digits (bit mask) it may take now: not used by a peer, not banned."""
        banned = [0] * 81
        for level in self.bans:
            for cell, digit in level:
                banned[cell] |= 1 << digit
        return allowed_digits(self.board, banned)

    # --------------------------------------------------------------------------------------------- actions
    def _push(self, cell: int, digit: int) -> None:
        self.board[cell] = digit
        self.accepted.append((cell, digit))
        self.bans.append(set())

    def _pop(self) -> tuple[int, int]:
        cell, digit = self.accepted.pop()
        self.board[cell] = 0
        self.bans.pop()  # made after this acceptance: conditional on it
        return cell, digit

    def settle(self) -> None:
        """Backtrack until the board is not at a dead end (or the search has failed)."""
        while not self.failed and dead_end(self.board, self.allowed()):
            self.backtrack()

    def backtrack(self) -> None:
        """Undo the latest acceptance and ban it in the state before it."""
        self.backtracks += 1
        if not self.accepted:
            self.failed = True  # nothing left to undo: the puzzle has no solution
            return
        self.bans[-2].add(self.accepted[-1])  # the state before it: bans[k] holds after k acceptances
        self._pop()

    def step(self, logp: list[list[float]], entropy_bound: float) -> list[int]:
        """Accept cells from one forward's digit log-probabilities (`logp[i][d - 1]` for cell i, digit d: any
        normalisation), then settle. Returns the accepted cells (empty when the search had already ended)."""
        if self.done:
            return []
        allowed = self.allowed()
        ranked = []  # (entropy, cell, digit) for every blank cell, its distribution over the allowed digits
        for i, mask in enumerate(allowed):
            if self.board[i]:
                continue
            digits = bits(mask)
            scores = [logp[i][d - 1] for d in digits]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            entropy = -sum(w / total * math.log(w / total) for w in weights if w > 0)
            best = digits[max(range(len(digits)), key=scores.__getitem__)]
            ranked.append((max(entropy, 0.0), i, best))
        ranked.sort()
        group, used, spent = [], {}, 0.0
        for k, (entropy, i, digit) in enumerate(ranked):
            spent += entropy
            if k and spent - entropy > entropy_bound:  # ascending: the current entry is the running max
                break
            peers = (("r", i // 9), ("c", i % 9), ("b", BOX_OF[i]))
            if any(used.get(unit, 0) >> digit & 1 for unit in peers):
                continue  # clashes with an acceptance earlier in this step: wait for the next step
            for unit in peers:
                used[unit] = used.get(unit, 0) | 1 << digit
            group.append(i)
            self._push(i, digit)
            if dead_end(self.board, self.allowed()):  # this one (after the surer ones) leads nowhere
                self._pop()
                self.bans[-1].add((i, digit))
                self.backtracks += 1
                group.pop()
                break
        self.settle()
        return group


@dataclass
class OrderedSearch:
    """The same rules for a model that fills the cells in reading order (the autoregressive baseline): blank
    cell k takes the most likely allowed digit of its distribution; a dead end bans that digit there and tries
    the next one from the stored distribution (no new forward); a blank cell with no digit left sends the
    search back to the previous blank cell. `changed_from`: the first cell changed since the caller last
    looked (it truncates its cache there)."""

    puzzle: str
    board: list[int] = field(init=False)
    blanks: list[int] = field(init=False)
    logps: list[list[float]] = field(init=False, default_factory=list)  # per decided depth, its distribution
    bans: list[int] = field(init=False, default_factory=lambda: [0])  # per depth, banned digits (bits)
    failed: bool = field(init=False, default=False)
    backtracks: int = field(init=False, default=0)
    changed_from: int = field(init=False, default=81)

    def __post_init__(self) -> None:
        self.board = [int(ch) for ch in self.puzzle]
        self.blanks = [i for i, v in enumerate(self.board) if v == 0]
        self.failed = dead_end(self.board, allowed_digits(self.board))

    @property
    def solved(self) -> bool:
        return not self.failed and len(self.bans) > len(self.blanks)

    @property
    def done(self) -> bool:
        return self.failed or self.solved

    @property
    def next_cell(self) -> int:
        """The blank cell the next prediction is for (81 when none)."""
        k = len(self.bans) - 1
        return self.blanks[k] if k < len(self.blanks) else 81

    def text(self) -> str:
        return "".join(map(str, self.board))

    def choose(self, logp: list[float]) -> None:
        """`logp[d - 1]`: the model's log-probability of digit d at `next_cell`."""
        self.logps.append(logp)
        while True:
            k = len(self.logps) - 1
            cell = self.blanks[k]
            options = allowed_digits(self.board)[cell] & ~self.bans[k]
            if not options:  # nothing left here: back to the previous blank cell
                self.logps.pop()
                self.bans.pop()
                self.backtracks += 1
                if not self.logps:
                    self.failed = True
                    return
                prev = self.blanks[k - 1]
                self.bans[k - 1] |= 1 << self.board[prev]
                self.board[prev] = 0
                self.changed_from = min(self.changed_from, prev)
                continue
            digit = max(bits(options), key=lambda d: self.logps[k][d - 1])
            self.board[cell] = digit
            self.changed_from = min(self.changed_from, cell)
            if dead_end(self.board, allowed_digits(self.board)):
                self.board[cell] = 0
                self.bans[k] |= 1 << digit
                self.backtracks += 1
                continue
            self.bans.append(0)
            return
