"""Sudoku puzzles for the case study: full grids, puzzles with a unique solution, difficulty by givens.

A grid is a string of 81 digits, row by row; in a puzzle "0" marks an empty cell. Everything is driven by
a `random.Random` passed in, so data sets are reproducible from a seed.

Puzzles are made by emptying cells of a random full grid, in random order, keeping each removal only if the
puzzle still has exactly one solution (checked by a complete solver that counts up to two solutions).
`augment` applies Sudoku's symmetries (digit relabelling, row and column swaps within a band or stack,
band and stack swaps, transposition), which keep a valid puzzle valid and unique, so a few thousand
generated puzzles give an endless training stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DIGITS = "123456789"
ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
PEERS = [sorted({p for unit in UNITS if i in unit for p in unit} - {i}) for i in range(81)]


def _candidates(cells: list[int], i: int) -> list[int]:
    used = {cells[p] for p in PEERS[i]}
    return [d for d in range(1, 10) if d not in used]


BOX_OF = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
ALL_DIGITS = 0b1111111110  # bit d set: digit d (1-9) is still possible


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Number of solutions, counting no further than `limit` (backtracking on the most constrained cell, with
    the digits used per row, column and box as bit masks: the generator calls this once per emptied cell)."""
    cells = [int(ch) for ch in puzzle]
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            r, c, b = i // 9, i % 9, BOX_OF[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0  # the givens clash
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    empty = [i for i, v in enumerate(cells) if v == 0]
    found = 0

    def search(k: int) -> bool:
        nonlocal found
        if k == len(empty):
            found += 1
            return found >= limit
        best, best_free, best_count = k, 0, 10
        for j in range(k, len(empty)):  # the most constrained of the remaining empty cells
            i = empty[j]
            free = ALL_DIGITS & ~(rows[i // 9] | cols[i % 9] | boxes[BOX_OF[i]])
            n = bin(free).count("1")
            if n < best_count:
                best, best_free, best_count = j, free, n
                if n <= 1:
                    break
        if best_count == 0:
            return False
        empty[k], empty[best] = empty[best], empty[k]
        i = empty[k]
        r, c, b = i // 9, i % 9, BOX_OF[i]
        free = best_free
        while free:
            bit = free & -free
            free ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            stop = search(k + 1)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if stop:
                break
        empty[k], empty[best] = empty[best], empty[k]
        return found >= limit

    search(0)
    return found


def solve(puzzle: str) -> str | None:
    """The unique solution, or None if the puzzle has none or several."""
    cells = [int(ch) for ch in puzzle]

    def search() -> bool:
        empty = [i for i, v in enumerate(cells) if v == 0]
        if not empty:
            return True
        i = min(empty, key=lambda j: len(_candidates(cells, j)))
        for d in _candidates(cells, i):
            cells[i] = d
            if search():
                return True
        cells[i] = 0
        return False

    if count_solutions(puzzle) != 1:
        return None
    search()
    return "".join(map(str, cells))


def random_solution(rng: random.Random) -> str:
    """A uniformly shuffled full grid: fill by randomized backtracking."""
    cells = [0] * 81

    def fill(i: int) -> bool:
        if i == 81:
            return True
        digits = _candidates(cells, i)
        rng.shuffle(digits)
        for d in digits:
            cells[i] = d
            if fill(i + 1):
                return True
        cells[i] = 0
        return False

    fill(0)
    return "".join(map(str, cells))


def make_puzzle(solution: str, givens: int, rng: random.Random) -> str:
    """Empty cells of `solution` in random order while the solution stays unique, down to `givens` filled
    cells (or as far as uniqueness allows)."""
    cells = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    filled = 81
    for i in order:
        if filled <= givens:
            break
        keep, cells[i] = cells[i], "0"
        if count_solutions("".join(cells)) == 1:
            filled -= 1
        else:
            cells[i] = keep
    return "".join(cells)


def generate(n: int, givens: tuple[int, int], seed: int) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs with a number of givens drawn uniformly from the inclusive range."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        solution = random_solution(rng)
        pairs.append((make_puzzle(solution, rng.randint(*givens), rng), solution))
    return pairs


def generate_exact(n: int, givens: int, seed: int) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs with exactly `givens` givens: puzzles that uniqueness stops above it are
    dropped and a new grid is drawn (below about 26 givens most are: 22 takes many tries)."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        solution = random_solution(rng)
        puzzle = make_puzzle(solution, givens, rng)
        if 81 - puzzle.count("0") == givens:
            pairs.append((puzzle, solution))
    return pairs


def augment(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    """Apply one random symmetry of Sudoku to a (puzzle, solution) pair."""
    relabel = list(DIGITS)
    rng.shuffle(relabel)
    digit_map = {"0": "0", **{d: relabel[k] for k, d in enumerate(DIGITS)}}

    def line_order() -> list[int]:
        bands = rng.sample(range(3), 3)
        return [b * 3 + r for b in bands for r in rng.sample(range(3), 3)]

    rows, cols, transpose = line_order(), line_order(), rng.random() < 0.5

    def apply(grid: str) -> str:
        out = []
        for r in range(9):
            for c in range(9):
                src_r, src_c = (cols[c], rows[r]) if transpose else (rows[r], cols[c])
                out.append(digit_map[grid[src_r * 9 + src_c]])
        return "".join(out)

    return apply(puzzle), apply(solution)


def is_solution(candidate: str, puzzle: str) -> bool:
    """Complete (81 digits 1-9), valid (every row, column and box a permutation) and consistent with the
    givens."""
    if len(candidate) != 81 or any(ch not in DIGITS for ch in candidate):
        return False
    if any(p != "0" and p != c for p, c in zip(puzzle, candidate)):
        return False
    return all(sorted(candidate[i] for i in unit) == list(DIGITS) for unit in UNITS)


CELL_LETTERS = "abcdefghi"


def prompt_text(puzzle: str) -> str:
    """The model's prompt for a puzzle: one word per cell naming its row, column and content ("ae0" = row 1,
    column 5, blank). Naming the cell in the token gives the model each cell's row, column and box by content,
    so it does not have to work them out from positions (it only has 1-D rotary positions)."""
    return " ".join(f"{CELL_LETTERS[i // 9]}{CELL_LETTERS[i % 9]}{ch}" for i, ch in enumerate(puzzle))


def parse_prompt(text: str) -> str:
    """A puzzle from either a Sudoku model's prompt (`prompt_text`: 81 cell words, row by row) or a grid
    (`parse_grid`). Raises ValueError naming the problem, as `parse_grid` does."""
    words = text.split()
    if not words or not all(len(w) == 3 and w[0] in CELL_LETTERS and w[1] in CELL_LETTERS and w[2].isdigit()
                            and w[2].isascii() for w in words):
        return parse_grid(text)
    if len(words) != 81:
        raise ValueError(f"a Sudoku prompt has 81 cell words (\"aa0\" .. \"ii9\", row by row), got {len(words)}")
    for k, word in enumerate(words):
        expected = CELL_LETTERS[k // 9] + CELL_LETTERS[k % 9]
        if word[:2] != expected:
            raise ValueError(f"cell word {k + 1} is {word!r}: the cells go row by row, so it names cell "
                             f"{expected!r} (row {k // 9 + 1}, column {k % 9 + 1})")
    puzzle = "".join(word[2] for word in words)
    check_givens(puzzle)
    return puzzle


BLANKS = "0."  # an empty cell
SEPARATORS = " \t\r\n|-+,"  # what `format_grid` draws between cells and boxes, whitespace and commas


def parse_grid(text: str) -> str:
    """A puzzle from 81 cells written row by row: digits 1-9 for givens, 0 or . for blanks, optionally separated
    by whitespace, commas or the `|`, `-`, `+` of `format_grid`'s boxes. Raises ValueError naming the problem for
    any other character (a letter is a typo, not a separator), a wrong number of cells, or givens that break a
    rule (the same digit twice in a row, column or box)."""
    cells = []
    for pos, ch in enumerate(text):
        if ch.isascii() and (ch.isdigit() or ch == "."):
            cells.append("0" if ch == "." else ch)
        elif ch not in SEPARATORS:
            raise ValueError(f"unexpected character {ch!r} at position {pos + 1}: a Sudoku is written with digits, "
                             "0 or . for blanks, and optionally spaces, commas, |, - or + between cells")
    if len(cells) != 81:
        raise ValueError(f"a Sudoku needs 81 cells (digits, 0 or . for blanks), got {len(cells)}")
    puzzle = "".join(cells)
    check_givens(puzzle)
    return puzzle


def check_givens(puzzle: str) -> None:
    """Raise ValueError naming the first unit (row, column or box, counted from 1) that holds a digit twice."""
    for kind, units in (("row", ROWS), ("column", COLS), ("box", BOXES)):
        for k, unit in enumerate(units):
            seen: dict[str, int] = {}
            for i in unit:
                d = puzzle[i]
                if d != "0" and d in seen:
                    raise ValueError(f"the givens contradict each other: {d} appears twice in {kind} {k + 1} "
                                     f"(cells r{seen[d] // 9 + 1}c{seen[d] % 9 + 1} and r{i // 9 + 1}c{i % 9 + 1})")
                seen[d] = i


def trained_givens(model_dir) -> tuple[int, int] | None:
    """The (fewest, most) givens of the puzzles a Sudoku checkpoint was trained on: `sudoku_trained_givens` in
    its generation_config.json (written by whoever ships it), or None when it does not say."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("sudoku_trained_givens")
    except (OSError, ValueError):
        return None
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value)):
        return value[0], value[1]
    return None


def format_grid(grid: str, blank: str = ".") -> str:
    """A 9x9 board with box separators."""
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = [grid[r * 9 + c] if grid[r * 9 + c] != "0" else blank for c in range(9)]
        lines.append(" | ".join(" ".join(row[b * 3:(b + 1) * 3]) for b in range(3)))
    return "\n".join(lines)


@dataclass(frozen=True)
class HarderThanTrained:
    """A puzzle with fewer givens than the checkpoint was trained on: the counts and what to tell the user."""

    givens: int
    trained_givens: tuple[int, int]  # (fewest, most), from `trained_givens`

    @property
    def message(self) -> str:
        low, high = self.trained_givens
        return (f"this puzzle has {self.givens} givens; the model was trained on puzzles with {low}-{high}, "
                "so it is harder than anything the model learned and it may find no valid solution")


def harder_than_trained(puzzle: str, trained: tuple[int, int] | None) -> HarderThanTrained | None:
    """The note for `puzzle` when it has fewer givens than the checkpoint was trained on (`trained`, from
    `trained_givens`), else None (also when the checkpoint does not say). The one place that counts the givens
    for it: the CLI prints its message on stderr; the server returns it as `usage.letterpress.harder_than_trained`."""
    givens = 81 - puzzle.count("0")
    if trained is None or givens >= trained[0]:
        return None
    return HarderThanTrained(givens, (trained[0], trained[1]))
