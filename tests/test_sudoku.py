"""The Sudoku generator: valid grids, unique puzzles, difficulty by givens, symmetry-preserving augmentation."""

from __future__ import annotations

import random

import pytest

from letterpress.apps.sudoku import augment, count_solutions, format_grid, generate, is_solution, parse_grid, solve


def test_generated_puzzles_are_unique_and_consistent():
    pairs = generate(8, givens=(30, 40), seed=0)
    assert pairs == generate(8, givens=(30, 40), seed=0)  # reproducible from the seed
    for puzzle, solution in pairs:
        assert is_solution(solution, puzzle)
        assert count_solutions(puzzle) == 1 and solve(puzzle) == solution
        assert 30 <= 81 - puzzle.count("0") <= 40


def test_augmentation_keeps_puzzles_valid_and_unique():
    rng = random.Random(3)
    for puzzle, solution in generate(4, givens=(32, 36), seed=1):
        new_puzzle, new_solution = augment(puzzle, solution, rng)
        assert new_puzzle != puzzle and new_puzzle.count("0") == puzzle.count("0")
        assert is_solution(new_solution, new_puzzle) and count_solutions(new_puzzle) == 1


def test_checker_rejects_wrong_answers():
    puzzle, solution = generate(1, givens=(35, 35), seed=2)[0]
    swapped = solution[1] + solution[0] + solution[2:]
    assert not is_solution(swapped, puzzle)  # breaks a column
    assert not is_solution(solution[:80], puzzle)
    given = next(i for i, ch in enumerate(puzzle) if ch != "0")
    other = solution.replace(solution[given], "x")
    assert not is_solution(other, puzzle)
    assert count_solutions("0" * 81, limit=2) == 2 and solve("0" * 81) is None


def test_parse_and_format():
    puzzle, _ = generate(1, givens=(40, 40), seed=4)[0]
    assert parse_grid(format_grid(puzzle)) == puzzle
    with pytest.raises(ValueError, match="81 cells"):
        parse_grid("123")


def test_training_stream_givens_and_recipes():
    """The recipes' training streams: the asked-for difficulty, augmented beyond the base puzzles, and the two
    Sudoku diffusion recipes differ only in their puzzles."""
    from letterpress.train.recipes import get_recipe
    from letterpress.train.recipes_builtin import SUDOKU_HARDER_GIVENS, sudoku_training_pairs

    for givens in ((50, 60), SUDOKU_HARDER_GIVENS):
        pairs = sudoku_training_pairs(seed=7, n_base=6, n_stream=12, givens=givens)
        assert len(pairs) == 12 and len(set(pairs)) == 12
        for puzzle, solution in pairs:
            assert givens[0] <= 81 - puzzle.count("0") <= givens[1] and is_solution(solution, puzzle)
    plain, harder = get_recipe("sudoku"), get_recipe("sudoku-harder")
    assert plain.model_config == harder.model_config and plain.config() == harder.config()
