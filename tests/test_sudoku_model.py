"""The shipped Sudoku model (letterpress/assets/sudoku): it loads like a released checkpoint and solves
held-out puzzles (never in its training stream; see BENCHMARKS.md, "Sudoku")."""

from __future__ import annotations

import pytest

from letterpress.embedded import ASSETS, shipped_models

SUDOKU = ASSETS / "sudoku"
pytestmark = pytest.mark.skipif("sudoku" not in shipped_models(), reason="the Sudoku model is not shipped")


@pytest.fixture(scope="module")
def held_out():
    from letterpress.train.recipes_builtin import held_out_puzzles

    return held_out_puzzles(100)  # the first 100 of the 1,000 held-out puzzles: fixed by their seed


def test_checkpoint_format():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (SUDOKU / name).is_file(), name
    from letterpress.tokenizer import Tokenizer

    from letterpress.apps.sudoku import prompt_text

    tok = Tokenizer.from_dir(SUDOKU)
    assert tok.encode("0123456789") == list(range(7, 17))
    assert tok.decode(tok.encode("530070000")) == "530070000"
    # the prompt: one word per cell naming row, column and content, all distinct ids after the digits
    puzzle = "530070000600195000098000060800060003400800001700000002060000280000419005000080079"
    ids = tok.encode(prompt_text(puzzle))
    assert len(ids) == 81 and all(i >= 17 for i in ids)
    assert ids[:2] == [17 + 0 * 10 + 5, 17 + 1 * 10 + 3]  # "aa5", "ab3"
    assert tok.vocab_size == 17 + 810


def test_held_out_puzzles_are_fixed_and_valid(held_out):
    from letterpress.apps import sudoku as S
    from letterpress.train.recipes_builtin import SUDOKU_GIVENS

    assert len(held_out) == 100
    for puzzle, solution in held_out[:10]:
        assert S.is_solution(solution, puzzle)
        assert SUDOKU_GIVENS[0] <= 81 - puzzle.count("0") <= SUDOKU_GIVENS[1]


@pytest.fixture(scope="module")
def solved(held_out):
    from letterpress.apps.sudoku_solve import solve_diffusion

    return solve_diffusion(SUDOKU, [p for p, _ in held_out])  # greedy, the checkpoint's sampler: deterministic


def test_solves_at_least_90_of_100_held_out_puzzles(solved):
    """The issue's bar (the shipped model solves 95 of these 100, 95.0% of all 1,000: BENCHMARKS.md, Sudoku),
    with many tokens per forward: the point of diffusion here."""
    assert solved["solved"] >= 90, f"solved {solved['solved']}/100"
    assert solved["tokens_per_forward"] > 10


def test_outputs_complete_grids_that_keep_the_givens(held_out):
    """What the shipped model does reliably on every puzzle (it solves 95 of these 100)."""
    from letterpress import LLM, SamplingParams
    from letterpress.apps.sudoku_solve import prompt_ids

    llm = LLM(SUDOKU, max_num_seqs=10, max_model_len=256)
    puzzles = [p for p, _ in held_out[:10]]
    outs = llm.run([llm.make_request(prompt_ids(llm.tokenizer, p), SamplingParams(seed=i, greedy=True))
                    for i, p in enumerate(puzzles)])
    for p, out in zip(puzzles, outs):
        assert len(out.text) == 81 and all(ch in "123456789" for ch in out.text) and out.finish_reason == "stop"
        assert all(g == "0" or g == c for g, c in zip(p, out.text))
        assert out.tokens_per_forward > 1
