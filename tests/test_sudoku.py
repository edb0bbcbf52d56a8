"""The Sudoku generator: valid grids, unique puzzles, difficulty by givens, symmetry-preserving augmentation."""

from __future__ import annotations

import random

import pytest

from letterpress.apps.sudoku import (augment, count_solutions, format_grid, generate, harder_than_trained,
                                     is_solution, parse_grid, solve)


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
    rows = [puzzle[r * 9:(r + 1) * 9] for r in range(9)]
    assert parse_grid("\n".join(",".join(row) for row in rows)) == puzzle  # commas and newlines separate
    assert parse_grid(puzzle.replace("0", ".")) == puzzle


@pytest.mark.parametrize("edit, message", [
    (lambda p: "a" + p[1:], "unexpected character 'a' at position 1"),  # a letter is not a separator
    (lambda p: p[:80] + "/", "unexpected character '/' at position 81"),
    (lambda p: p[:40] + "\u0663" + p[41:], "unexpected character"),  # an Arabic-Indic 3 is not a Sudoku digit
])
def test_parse_refuses_stray_characters(edit, message):
    puzzle, _ = generate(1, givens=(40, 40), seed=4)[0]
    with pytest.raises(ValueError, match=message):
        parse_grid(edit(puzzle))


def test_parse_refuses_contradictory_givens():
    empty = "0" * 81
    with pytest.raises(ValueError, match=r"7 appears twice in row 3 \(cells r3c2 and r3c9\)"):
        parse_grid(empty[:19] + "7" + empty[20:26] + "7" + empty[27:])
    with pytest.raises(ValueError, match=r"4 appears twice in column 5 \(cells r1c5 and r9c5\)"):
        parse_grid(empty[:4] + "4" + empty[5:76] + "4" + empty[77:])
    with pytest.raises(ValueError, match=r"9 appears twice in box 5 \(cells r4c4 and r6c6\)"):
        parse_grid(empty[:30] + "9" + empty[31:50] + "9" + empty[51:])


def test_the_harder_than_trained_note_counts_the_givens_once():
    """One function counts a puzzle's givens for the note: the CLI's message and the server's fields come from it."""
    puzzle, _ = generate(1, givens=(30, 30), seed=4)[0]
    note = harder_than_trained(puzzle, (32, 40))
    assert note.givens == 30 and note.trained_givens == (32, 40)
    assert note.message.startswith("this puzzle has 30 givens; the model was trained on puzzles with 32-40, ")
    assert harder_than_trained(puzzle, (30, 40)) is None and harder_than_trained(puzzle, None) is None


def test_training_stream_givens_and_recipes():
    """The recipes' training streams: the asked-for difficulty, augmented beyond the base puzzles, and the two
    Sudoku diffusion recipes differ only in their puzzles."""
    from letterpress.train.recipes import get_recipe
    from letterpress.train.recipes_builtin import SUDOKU_HARD_GIVENS, SUDOKU_HARDER_GIVENS, sudoku_training_pairs

    for givens, n_base in (((50, 60), 6), (SUDOKU_HARDER_GIVENS, 6), (SUDOKU_HARD_GIVENS, 2)):
        pairs = sudoku_training_pairs(seed=7, n_base=n_base, n_stream=12, givens=givens)
        assert len(pairs) == 12 and len(set(pairs)) == 12
        for puzzle, solution in pairs:
            assert givens[0] <= 81 - puzzle.count("0") <= givens[1] and is_solution(solution, puzzle)
    plain, harder = get_recipe("sudoku"), get_recipe("sudoku-harder")
    assert plain.model_config == harder.model_config and plain.config() == harder.config()
    assert get_recipe("sudoku-hard").model_config == plain.model_config


def test_bucket_puzzles_have_exactly_their_givens():
    from letterpress.apps.sudoku import generate_exact

    pairs = generate_exact(3, 27, seed=5)
    assert pairs == generate_exact(3, 27, seed=5) and generate_exact(2, 27, seed=5) == pairs[:2]
    for puzzle, solution in pairs:
        assert 81 - puzzle.count("0") == 27 and count_solutions(puzzle) == 1 and is_solution(solution, puzzle)


@pytest.mark.parametrize("solved, n, printed", [
    (1000, 1000, "99.6-100"),  # the lower bound is 99.62%, not 100
    (0, 1000, "0-0.4"),  # the upper bound is 0.38%, not 0
    (199, 200, "97-99.9"),  # the upper bound is 99.91%: below 100
    (1, 50, "0.4-10"),
    (500, 1000, "47-53"),  # away from the ends: whole numbers
    (30, 30, "89-100"),  # 100 is exact when every puzzle was solved
])
def test_benchmark_intervals_do_not_round_onto_0_or_100(solved, n, printed):
    """benchmarks/sudoku.py's 95% Wilson intervals: a bound strictly inside 0-100% is never printed as 0 or 100."""
    from benchmarks.sudoku import percent_interval, wilson

    assert percent_interval(*wilson(solved, n)) == printed
    assert percent_interval(0.5001, 0.5004) == "50.01-50.04"  # different bounds never print alike
