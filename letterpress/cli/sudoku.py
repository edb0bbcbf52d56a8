"""`letterpress sudoku`: solve a puzzle with the embedded Sudoku model, showing the board fill in step by step.

    letterpress sudoku "530070000600195000098000060800060003400800001700000002060000280000419005000080079"
    echo "53..7....6..195..." | letterpress sudoku

Every denoising step's argmax draft is drawn over the board (redrawn in place with ANSI escapes when stdout is a
terminal; otherwise only the final board is printed), then the solution and the stats. The model's answer is
checked against the rules and the givens: an answer that breaks either is never printed; the command says "no
valid solution found" and exits with 1. Puzzles whose givens contradict each other, or with characters other
than digits, blanks (0 or .) and separators (whitespace , | - +), are refused before the model loads (exit 2).

A puzzle with fewer givens than the checkpoint was trained on (`sudoku_trained_givens` in its
generation_config.json) gets a note on stderr: it is harder than anything the model learned.

`--rule-mask` decodes with the Sudoku rules (letterpress/apps/sudoku_rules.py): a digit that clashes with a given
or an accepted cell is never accepted, and a dead end is backtracked, within `--max-forwards` decoder passes.
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
    p.add_argument("--rule-mask", action="store_true",
                   help="accept only digits the rules allow and backtrack at a dead end (see README, Sudoku case study)")
    p.add_argument("--max-forwards", type=int, default=81, help="with --rule-mask: the most decoder passes")
    p.add_argument("--entropy-bound", type=float, default=None,
                   help="with --rule-mask: the acceptance bound (default: the checkpoint's)")


def _cells(ids: list[int], digit_of: dict[int, str]) -> str:
    """81 cells from canvas token ids: the digit of each of the first 81 tokens, "0" where it is not one."""
    return "".join(digit_of.get(i, "0") for i in ids[:81]).ljust(81, "0")


def _board(puzzle: str, cells: str) -> str:
    """The draft over the puzzle: the givens, then the draft's digits; '.' where it has none yet."""
    from ..apps.sudoku import format_grid

    return format_grid("".join(g if g != "0" else c for g, c in zip(puzzle, cells)))


def harder_than_trained(puzzle: str, model_dir) -> str | None:
    """The note for a puzzle with fewer givens than the checkpoint was trained on, or None."""
    from ..apps import sudoku

    note = sudoku.harder_than_trained(puzzle, sudoku.trained_givens(model_dir))
    return None if note is None else "note: " + note.message


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): the puzzle (read from stdin when not given; kept as args.grid) and
    --max-forwards."""
    from ..apps.sudoku import parse_grid

    if args.puzzle is None and sys.stdin.isatty():  # else it would wait with no word of what for
        print("paste the puzzle (81 cells, 0 or . for blanks), then Ctrl-D:", file=sys.stderr)
    text = args.puzzle if args.puzzle is not None else sys.stdin.read()
    try:
        args.grid = parse_grid(text)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if args.max_forwards < 1:
        raise RequestError(f"--max-forwards must be a positive integer, got {args.max_forwards}")
    if not 0 <= args.delay <= 60:  # also nan
        raise RequestError(f"--delay must be between 0 and 60 seconds, got {args.delay}")
    if args.entropy_bound is not None and not 0 < args.entropy_bound <= float("inf"):
        raise RequestError(f"--entropy-bound must lie in (0, inf], got {args.entropy_bound}")


def run(args: argparse.Namespace) -> int:
    from ..embedded import ASSETS

    puzzle = args.grid  # parsed by check (cli.main runs it first)
    model_dir = args.model or ASSETS / "sudoku"
    check_sudoku_model(model_dir, puzzle)
    note = harder_than_trained(puzzle, model_dir)
    if note:
        print(note if args.rule_mask else note + " (--rule-mask helps)", file=sys.stderr)
    return _run_ruled(args, puzzle, model_dir) if args.rule_mask else _run_plain(args, puzzle, model_dir)


def check_sudoku_model(model_dir, puzzle: str) -> None:
    """A model whose tokenizer and canvas do not fit a Sudoku prompt is one line, as the server says it; it
    used to reach the solver (a tensor-shape traceback) or a misleading max_model_len error."""
    from ..apps.sudoku_solve import sudoku_token_ids
    from ..checkpoint import resolve
    from ..config import load_model_config
    from ..tokenizer import Tokenizer

    folder = resolve(model_dir)
    try:
        sudoku_token_ids(Tokenizer.from_dir(folder), load_model_config(folder).canvas_length, puzzle)
    except ValueError as e:
        raise RequestError(f"{model_dir} is not a Sudoku model: {e}") from None


def _show(puzzle: str, cells: str, step: int, height: int, redraw: bool) -> None:
    """Draw one step's board over the previous drawing (a terminal only)."""
    if redraw:
        sys.stdout.write(f"\x1b[{height + 1}F")  # back to the top of the previous drawing
    sys.stdout.write(f"step {step:2d}\x1b[K\n" + "\n".join(line + "\x1b[K" for line in
                                                            _board(puzzle, cells).splitlines()) + "\n")
    sys.stdout.flush()


def _report(puzzle: str, answer: str, stats: str, drawn: bool, height: int) -> int:
    """The final board if `answer` is a valid solution of `puzzle` (exit 0), else the puzzle and "no valid
    solution found" (exit 1): an answer that breaks a rule or overwrites a given is never printed."""
    from ..apps.sudoku import format_grid, is_solution

    if drawn:
        sys.stdout.write(f"\x1b[{height + 1}F\x1b[J")  # replace the animation with the final board
    if not is_solution(answer, puzzle):
        print(format_grid(puzzle))
        print(f"no valid solution found (the model's answer breaks a rule or a given, or it ran out of steps) | {stats}")
        return 1
    print(format_grid(answer))
    print(answer)
    print(f"valid: yes | {stats}")
    return 0


def _run_ruled(args: argparse.Namespace, puzzle: str, model_dir) -> int:
    from ..apps.sudoku import format_grid
    from ..apps.sudoku_solve import solve_diffusion_ruled
    from ..config import load_generation_defaults, load_model_config

    bound = args.entropy_bound
    if bound is None:
        bound = load_generation_defaults(model_dir, load_model_config(model_dir)).entropy_bound
    tty = sys.stdout.isatty()
    height = len(format_grid(puzzle).splitlines())
    drawn = False

    def show(_k, search, forward) -> None:
        nonlocal drawn
        if tty:
            _show(puzzle, search.text(), forward, height, drawn)
            drawn = True
            time.sleep(args.delay)

    start = time.perf_counter()
    r = solve_diffusion_ruled(model_dir, [puzzle], batch=1, max_forwards=args.max_forwards, entropy_bound=bound,
                              seed=args.seed, on_step=show)
    seconds = time.perf_counter() - start
    forwards = int(r["mean_forwards"])
    solved = bool(r["outputs"][0])  # cells per forward only of a board filled in
    per_forward = f"{puzzle.count('0') / forwards:.2f} cells/forward | " if forwards and solved else ""
    stats = (f"{forwards} forwards (at most {args.max_forwards}) | {per_forward}"
             f"{int(r['mean_backtracks'])} backtracks | rule mask | {seconds:.2f} s")
    if r["no_solution"][0]:
        if drawn:
            sys.stdout.write(f"\x1b[{height + 1}F\x1b[J")
        print(format_grid(puzzle))
        print(f"no solution: the givens admit none (the rule search ran out of digits to try) | {stats}")
        return 1
    return _report(puzzle, r["outputs"][0] or "0" * 81, stats, drawn, height)


def _run_plain(args: argparse.Namespace, puzzle: str, model_dir) -> int:
    from ..apps.sudoku import format_grid
    from ..apps.sudoku_solve import prompt_ids
    from ..engine.llm import LLM
    from ..engine.request import SamplingParams

    llm = LLM(model_dir, max_num_seqs=1, max_model_len=256)
    digit_of = {i: d for i in range(llm.tokenizer.vocab_size) if (d := llm.tokenizer.decode([i])) in set("123456789")}
    tty = sys.stdout.isatty()
    height = len(format_grid(puzzle).splitlines())
    drawn = False

    def show(event) -> None:
        nonlocal drawn
        if event.final or not tty:
            return
        _show(puzzle, _cells(event.token_ids, digit_of), event.step, height, drawn)
        drawn = True
        time.sleep(args.delay)

    params = SamplingParams(seed=args.seed, greedy=not args.sample, max_denoising_steps=args.max_denoising_steps)
    request = llm.make_request(prompt_ids(llm.tokenizer, puzzle), params, listener=show, want_drafts=tty)
    start = time.perf_counter()
    out = llm.run([request])[0]
    seconds = time.perf_counter() - start
    steps = "+".join(str(s) for s in out.steps_per_canvas)
    stats = f"steps {steps} | {out.tokens_per_forward:.2f} tokens/forward | {seconds:.2f} s"
    return _report(puzzle, _cells(out.token_ids, digit_of), stats, drawn, height)
