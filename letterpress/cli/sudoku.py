"""`letterpress sudoku`: solve a puzzle with the embedded Sudoku model, showing the board fill in step by step.

    letterpress sudoku "530070000600195000098000060800060003400800001700000002060000280000419005000080079"
    echo "53..7....6..195..." | letterpress sudoku

Every denoising step's argmax draft is drawn over the board (redrawn in place with ANSI escapes when stdout is a
terminal; otherwise only the final board is printed), then the solution and the stats. The model's answer is
checked against the rules and the givens: an answer that breaks either is never printed; the command says "no
valid solution found" and exits with 1. Puzzles whose givens contradict each other, or with characters other
than digits, blanks (0 or .) and separators (whitespace , | - +), are refused before the model loads (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import RequestError

HELP = "solve a Sudoku with the embedded Sudoku model, step by step"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("puzzle", nargs="?", default=None,
                   help="81 cells, row by row: digits, 0 or . for blanks, optionally separated by whitespace, commas "
                        "or | - + (as the printed board); default: stdin")
    p.add_argument("--model", default=None, help="a Sudoku checkpoint folder (default: the embedded one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", action="store_true", help="sample the proposals instead of taking the argmax")
    p.add_argument("--max-denoising-steps", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.15, help="seconds between redraws on a terminal")


def _cells(ids: list[int], digit_of: dict[int, str]) -> str:
    """81 cells from canvas token ids: the digit of each of the first 81 tokens, "0" where it is not one."""
    return "".join(digit_of.get(i, "0") for i in ids[:81]).ljust(81, "0")


def _board(puzzle: str, cells: str) -> str:
    """The draft over the puzzle: the givens, then the draft's digits; '.' where it has none yet."""
    from ..apps.sudoku import format_grid

    return format_grid("".join(g if g != "0" else c for g, c in zip(puzzle, cells)))


def run(args: argparse.Namespace) -> int:
    from ..apps.sudoku import format_grid, is_solution, parse_grid
    from ..apps.sudoku_solve import prompt_ids
    from ..embedded import ASSETS
    from ..engine.llm import LLM
    from ..engine.request import SamplingParams

    text = args.puzzle if args.puzzle is not None else sys.stdin.read()
    try:
        puzzle = parse_grid(text)
    except ValueError as e:
        raise RequestError(str(e)) from None
    llm = LLM(args.model or ASSETS / "sudoku", max_num_seqs=1, max_model_len=256)
    digit_of = {i: d for i in range(llm.tokenizer.vocab_size) if (d := llm.tokenizer.decode([i])) in set("123456789")}
    tty = sys.stdout.isatty()
    height = len(format_grid(puzzle).splitlines())
    drawn = False

    def show(event) -> None:
        nonlocal drawn
        if event.final or not tty:
            return
        if drawn:
            sys.stdout.write(f"\x1b[{height + 1}F")  # back to the top of the previous drawing
        sys.stdout.write(f"step {event.step:2d}\x1b[K\n" + "\n".join(line + "\x1b[K" for line in
                                                                    _board(puzzle, _cells(event.token_ids, digit_of)).splitlines()) + "\n")
        sys.stdout.flush()
        drawn = True
        time.sleep(args.delay)

    params = SamplingParams(seed=args.seed, greedy=not args.sample, max_denoising_steps=args.max_denoising_steps)
    request = llm.make_request(prompt_ids(llm.tokenizer, puzzle), params, listener=show, want_drafts=tty)
    start = time.perf_counter()
    out = llm.run([request])[0]
    seconds = time.perf_counter() - start
    answer = _cells(out.token_ids, digit_of)
    valid = is_solution(answer, puzzle)
    if drawn:
        sys.stdout.write(f"\x1b[{height + 1}F\x1b[J")  # replace the animation with the final board
    steps = "+".join(str(s) for s in out.steps_per_canvas)
    stats = f"steps {steps} | {out.tokens_per_forward:.2f} tokens/forward | {seconds:.2f} s"
    if not valid:  # never show an answer that breaks a rule or overwrites a given
        print(format_grid(puzzle))
        print(f"no valid solution found (the model's answer breaks a rule or a given) | {stats}")
        return 1
    print(format_grid(answer))
    print(answer)
    print(f"valid: yes | {stats}")
    return 0
