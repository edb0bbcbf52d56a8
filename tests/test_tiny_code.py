"""The shipped models end to end: tiny-code (the code model the infill and edit examples use; the default when
LETTERPRESS_DEFAULT_MODEL=tiny_code, as tests/conftest.py sets it) loads and generates; the `sudoku` command
solves a puzzle from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from letterpress.embedded import ASSETS, default_model_dir, shipped_models

TINY_CODE = ASSETS / "tiny_code"
shipped = pytest.mark.skipif("tiny_code" not in shipped_models(), reason="tiny-code is not shipped")


@shipped
def test_tiny_code_is_shipped_and_the_environment_variable_makes_it_the_default(monkeypatch):
    monkeypatch.setenv("LETTERPRESS_DEFAULT_MODEL", "tiny_code")
    assert default_model_dir() == TINY_CODE
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (TINY_CODE / name).is_file(), name


def test_shipped_models_fit_the_size_budget():
    total = sum(f.stat().st_size for folder in shipped_models().values() for f in folder.iterdir() if f.is_file())
    assert total <= 25 * 1024 * 1024, f"{total} bytes"


@shipped
def test_tiny_code_generates_text():
    from letterpress import LLM, SamplingParams

    llm = LLM()
    out = llm.generate("def fibonacci(n):", SamplingParams(max_new_tokens=24, seed=0, max_denoising_steps=16))[0]
    assert 1 <= len(out.token_ids) <= 24
    assert isinstance(out.text, str) and out.text == llm.tokenizer.decode(out.token_ids)
    assert out.tokens_per_forward > 0
    again = llm.generate("def fibonacci(n):", SamplingParams(max_new_tokens=24, seed=0, max_denoising_steps=16))[0]
    assert again.token_ids == out.token_ids


def letterpress(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "letterpress.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif("sudoku" not in shipped_models(), reason="the Sudoku model is not shipped")
def test_sudoku_command_end_to_end():
    from letterpress.apps import sudoku as S
    from letterpress.train.recipes_builtin import held_out_puzzles

    puzzle, solution = held_out_puzzles(1)[0]
    run = letterpress("sudoku", stdin=S.format_grid(puzzle) + "\n")  # the board as `format_grid` prints it
    assert run.returncode == 0, run.stderr  # the shipped model solves this one (an unsolved one exits 1)
    lines = run.stdout.splitlines()
    assert "\x1b[" not in run.stdout  # not a terminal: only the final board, no animation
    answer, verdict = lines[-2], lines[-1]
    assert answer == solution, run.stdout
    assert verdict.startswith("valid: yes | steps ") and "tokens/forward" in verdict
    assert S.format_grid(answer) in run.stdout


def test_sudoku_command_rejects_a_malformed_puzzle():
    run = letterpress("sudoku", "12345")
    assert run.returncode == 2
    assert run.stderr.strip() == "error: a Sudoku needs 81 cells (digits, 0 or . for blanks), got 5"
