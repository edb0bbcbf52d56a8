"""The Sudoku rule mask (letterpress/apps/sudoku_rules.py): whatever the proposals, a clashing digit is never
accepted, the givens stay, dead ends are found, and the backtracking search is sound (it finds the solution
when fed proposals that are always wrong)."""

from __future__ import annotations

import random

import pytest

from letterpress.apps.sudoku import UNITS, generate_exact, is_solution
from letterpress.apps.sudoku_rules import ALL, OrderedSearch, RuleSearch, allowed_digits, dead_end


def no_clash(board: list[int]) -> bool:
    """No digit twice in a row, column or box (blanks ignored)."""
    for unit in UNITS:
        digits = [board[i] for i in unit if board[i]]
        if len(digits) != len(set(digits)):
            return False
    return True


@pytest.fixture(scope="module")
def hard():
    return generate_exact(3, 26, seed=11)


def adversarial(solution: str, rng: random.Random) -> list[list[float]]:
    """Log-probabilities that put the solution's digit last everywhere and favour a random wrong digit, most of
    all one a peer already holds: a model that is confidently wrong."""
    logp = []
    for i in range(81):
        row = [rng.uniform(-3.0, 0.0) for _ in range(9)]
        row[rng.randrange(9)] = 5.0
        row[int(solution[i]) - 1] = -20.0
        logp.append(row)
    return logp


def test_rule_mask_never_accepts_a_clashing_digit_and_keeps_the_givens(hard):
    rng = random.Random(0)
    for puzzle, solution in hard:
        search, steps = RuleSearch(puzzle), 0
        while not search.done and steps < 2000:
            before = list(search.board)
            search.step(adversarial(solution, rng), entropy_bound=1.0)  # a loose bound: many cells per step
            steps += 1
            assert no_clash(search.board)
            assert all(search.board[i] == int(g) for i, g in enumerate(puzzle) if g != "0")
            assert search.board != before or search.backtracks  # every step accepts or backtracks
        # sound and complete: fed only wrong favourites, it still ends at the unique solution
        assert search.solved and search.text() == solution and is_solution(search.text(), puzzle)


def test_model_proposals_are_followed_when_legal(hard):
    """Proposals that are right everywhere solve the puzzle without a backtrack; the entropy bound decides how
    many cells a step accepts."""
    puzzle, solution = hard[0]
    right = [[0.0 if d == int(solution[i]) - 1 else -30.0 for d in range(9)] for i in range(81)]
    search, steps = RuleSearch(puzzle), 0
    while not search.done:
        search.step(right, entropy_bound=0.01)
        steps += 1
    assert search.text() == solution and search.backtracks == 0 and steps == 1  # all certain: one step
    unsure = [[row[d] / 10 for d in range(9)] for row in right]  # entropy > bound: one cell (+ forced ones) a step
    search, steps = RuleSearch(puzzle), 0
    while not search.done:
        search.step(unsure, entropy_bound=1e-6)
        steps += 1
    assert search.text() == solution and 1 < steps < puzzle.count("0")


def test_dead_ends():
    puzzle, solution = generate_exact(1, 30, seed=3)[0]
    board = [int(c) for c in puzzle]
    assert not dead_end(board, allowed_digits(board))
    full = [int(c) for c in solution]
    assert not dead_end(full, allowed_digits(full))
    full[0], full[1] = full[1], full[0]  # a digit twice in two columns
    assert dead_end(full, allowed_digits(full))
    row = full[:9] + [0] * 72  # a blank cell whose row, column and box use all nine digits
    row[9:18] = [0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert not dead_end(row, allowed_digits(row))
    stuck = [0] * 81
    stuck[1:9] = [1, 2, 3, 4, 5, 6, 7, 8]
    stuck[9] = 9  # cell 0: its row holds 1-8 and its column a 9
    assert allowed_digits(stuck)[0] == 0 and dead_end(stuck, allowed_digits(stuck))
    assert allowed_digits([0] * 81) == [ALL] * 81
    assert RuleSearch("11" + "0" * 79).failed  # clashing givens: nothing to search


def test_ordered_search_backtracks_in_reading_order(hard):
    rng = random.Random(1)
    for puzzle, solution in hard[:2]:
        search, predictions = OrderedSearch(puzzle), 0
        logp = adversarial(solution, rng)
        while not search.done and predictions < 5000:
            cell = search.next_cell
            assert search.board[cell] == 0 and all(search.board[i] for i in range(cell))
            search.choose(logp[cell])
            predictions += 1
            assert no_clash(search.board)
            assert all(search.board[i] == int(g) for i, g in enumerate(puzzle) if g != "0")
        assert search.solved and search.text() == solution
