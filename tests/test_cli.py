"""The CLI end to end, as a user runs it: a real subprocess on the embedded default model."""

from __future__ import annotations

import subprocess
import sys

import pytest


def letterpress(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "letterpress.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_prints_text_and_stats():
    run = letterpress("generate", "def fibonacci(n):", "--max-new-tokens", "12", "--seed", "0",
                      "--max-denoising-steps", "4")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "[12 tokens, 1 canvas(es), steps 4" in run.stderr and "tokens/forward" in run.stderr
    again = letterpress("generate", "def fibonacci(n):", "--max-new-tokens", "12", "--seed", "0",
                        "--max-denoising-steps", "4")
    assert again.stdout == run.stdout  # seeded => reproducible


def test_generate_with_explicit_model_and_chat_template():
    from letterpress.embedded import default_model_dir

    run = letterpress("generate", str(default_model_dir()), "hello", "--chat-template", "--max-new-tokens", "5",
                      "--max-denoising-steps", "3", "--seed", "1")
    assert run.returncode == 0, run.stderr
    assert "[5 tokens," in run.stderr


def test_chat_is_multi_turn_over_stdin():
    run = letterpress("chat", "--max-new-tokens", "6", "--max-denoising-steps", "3", "--seed", "0",
                      stdin="hello there\n/reset\nsecond question\n/exit\nnot read\n")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("[6 tokens,") == 2  # two answers, one stats line each
    assert len([line for line in run.stdout.splitlines() if line.strip()]) >= 2


@pytest.mark.parametrize("args, message", [
    (("generate", "/no/such/folder", "x"), "no such checkpoint folder"),
    (("generate", "x", "--max-new-tokens", "0"), "max_new_tokens must be a positive integer"),
    (("generate", "x", "--dtype", "int3"), "unknown dtype"),
])
def test_errors_are_one_line(args, message):
    run = letterpress(*args)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {run.stderr.strip()[7:]}"]
    assert message in run.stderr and "Traceback" not in run.stderr
