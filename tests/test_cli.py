"""The CLI end to end, as a user runs it: a real subprocess on the embedded default model."""

from __future__ import annotations

import os
import re
import socket
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
    (("generate", "x", "--kv-cache-memory", "10TiB"), "the KV cache (10240.0 GiB) does not fit in this device's memory"),
    (("generate", "x", "--block-size", "100000000"), "block_size must be a positive integer no larger than max_model_len"),
])
def test_errors_are_one_line(args, message):
    run = letterpress(*args)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {run.stderr.strip()[7:]}"]
    assert message in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------------------- light import, usage, flags
def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_cli_import_and_parser_import_no_torch():
    """`--help`, argument errors and shell completion need only the parser: building it must not load torch."""
    run = python("import sys, letterpress, letterpress.cli\n"
                 "letterpress.cli.build_parser()\n"
                 "print(sorted(m for m in ('torch', 'numpy', 'fastapi', 'uvicorn', 'tokenizers', 'safetensors')"
                 " if m in sys.modules))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


from letterpress.cli import VERBS  # noqa: E402  (light: no torch)

HELP_RUN = """
import sys
from letterpress.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([verb, "--help"] for verb in VERBS)])
def test_help_exits_zero_without_importing_torch(args):
    run = python(HELP_RUN, *args)
    assert run.stderr.strip().splitlines()[-1] == "exit 0 False", run.stderr
    assert run.stdout.startswith(("usage: letterpress", "letterpress "))


def test_argument_errors_show_the_verbs_usage_without_importing_torch():
    run = python(HELP_RUN, "generate", "x", "--no-such-flag")
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("usage: letterpress generate ")  # the verb's usage, not the top-level one
    assert "letterpress generate: error: unrecognized arguments: --no-such-flag" in run.stderr
    assert lines[-1] == "exit 2 False"
    run = python(HELP_RUN, "serve", "--port", "x")
    assert "usage: letterpress serve " in run.stderr and run.stderr.strip().endswith("exit 2 False")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(port):
    run = letterpress("serve", "--port", port)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"--port must be a TCP port, 0 to 65535 (0: any free port), got {port}" in run.stderr


@pytest.mark.parametrize("args, message", [
    (("generate", "/no/such/folder", "x"), "no such checkpoint folder"),
    (("generate", "x", "--max-new-tokens", "0"), "max_new_tokens must be a positive integer"),
    (("generate", "x", "--dtype", "int3"), "unknown dtype 'int3'"),
    (("chat", "--t-min", "5", "--t-max", "1"), "need t_min <= t_max"),
    (("infill", "f.py", "--line", "1", "--entropy-bound", "0"), "entropy_bound must lie in (0, inf]"),
    (("edit", "f.py", "no/such/dir/x", "--span", "0:1"), "no such checkpoint folder"),
    (("serve", "--max-denoising-steps", "0"), "max_denoising_steps must be a positive integer"),
    (("serve", "--port", "70000"), "--port must be a TCP port"),
    (("quantize", "nosuch", "out", "--format", "int8"), "no such checkpoint folder"),
    (("quantize", ".", "/", "--format", "int8"), "/ is not empty and is not a checkpoint"),
    (("merge-lora", ".", "adapter", "/"), "/ is not empty and is not a checkpoint"),
    (("merge-lora", ".", "adapter", "out", "--dtype", "int3"), "unknown dtype 'int3'"),
    (("sudoku", "12345"), "a Sudoku needs 81 cells"),
    (("sudoku", "0" * 81, "--max-forwards", "0"), "--max-forwards must be a positive integer"),
    (("sudoku", "0" * 81, "--delay", "nan"), "--delay must be between 0 and 60 seconds"),
    (("sudoku", "0" * 81, "--rule-mask", "--entropy-bound", "-1"), "--entropy-bound must lie in (0, inf]"),
    (("generate", "x", "--profile", "p", "--profile-steps", "-1"), "--profile-steps must be a positive integer"),
    (("generate", "x", "--compile", "--compile-mode", "bogus"), "--compile-mode 'bogus': torch.compile takes one of"),
    (("generate", "x", "--block-size", "0"), "--block-size must be a positive integer"),
    (("serve", "--host", "192.0.2.1", "--port", "8123"), "(this machine has no such address: check --host)"),
])
def test_bad_values_are_refused_before_torch_loads(args, message):
    """A verb's `check` runs before torch and the model load: a typo costs a fraction of a second, not the
    seconds of importing torch and loading weights (and the message is the one the engine would give)."""
    run = python("import sys\nfrom letterpress.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
                 "except SystemExit as e:\n    code = e.code\nprint(code, 'torch' in sys.modules)", *args)
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


def test_a_busy_port_is_refused_before_torch_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = python("import sys\nfrom letterpress.cli import main\nprint(main(sys.argv[1:]), 'torch' in sys.modules)",
                     "serve", "--port", str(port))
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    assert "Address already in use" in run.stderr


def test_every_verb_takes_verbosity_and_threads():
    import argparse

    from letterpress.cli import VERBS, build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(verbs) == set(VERBS)
    for name, sub in verbs.items():
        flags = {s for action in sub._actions for s in action.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet", "--threads"} <= flags, name
    args = parser.parse_args(["generate", "x", "-vv", "-q", "--threads", "3"])
    assert (args.verbose, args.quiet, args.threads) == (2, 1, 3)


def test_infill_strategies_match_the_library():
    from letterpress import infill
    from letterpress.cli import infill as infill_verb

    assert infill_verb.STRATEGIES == infill.STRATEGIES and infill_verb.DEFAULT_STRATEGY == infill.DEFAULT_STRATEGY


def test_log_levels(monkeypatch):
    import logging

    from letterpress.cli import configure_logging

    for (verbose, quiet), level in {(0, 0): logging.INFO, (1, 0): logging.DEBUG, (2, 0): logging.DEBUG,
                                    (0, 1): logging.WARNING, (0, 2): logging.ERROR, (0, 9): logging.CRITICAL}.items():
        assert configure_logging(verbose, quiet) == level
        assert logging.getLogger("letterpress.train.trainer").getEffectiveLevel() == level
    logging.getLogger("letterpress").setLevel(logging.NOTSET)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import os

    from letterpress.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for load, threads in ((0.0, 8), (0.4, 8), (2.6, 5), (7.6, 1), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == threads, load
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_threads_flag_and_debug_log():
    run = letterpress("generate", "def f(x):", "--max-new-tokens", "4", "--max-denoising-steps", "2", "--seed", "0",
                      "--threads", "1", "-v")
    assert run.returncode == 0, run.stderr
    assert " DEBUG letterpress.cli: 1 torch thread(s)" in run.stderr
    for threads in ("0", "100000"):  # 100,000 made torch's pool segfault
        run = letterpress("generate", "x", "--threads", threads)
        assert run.returncode == 2 and f"--threads must lie in [1, 1024], got {threads}" in run.stderr


def test_training_resume_is_logged_by_default_and_quiet_hides_it(tmp_path):
    from tests.train_fixtures import addition_lines, make_checkpoint, make_tokenizer, write_jsonl

    base = make_checkpoint(tmp_path / "base", make_tokenizer(tmp_path / "tok"))
    data = write_jsonl(tmp_path / "train.jsonl", addition_lines(8))
    train = ("train", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "2",
             "--batch-size", "2", "--save-every", "1", "--no-progress", "--device", "cpu", "--eval-every", "0")
    first = letterpress(*train, "--stop-after-steps", "1")
    assert first.returncode == 0, first.stderr
    resumed = letterpress(*train)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO letterpress\.train\.trainer: resumed from .* at step 1$",
                     resumed.stderr, re.M), resumed.stderr
    again = letterpress(*train, "-q")  # finished: resumes at step 2, says nothing at -q
    assert again.returncode == 0 and "resumed" not in again.stderr, again.stderr


# ------------------------------------------------------------------------------- devices and ports
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: "), ("cuda:1", "--device cuda:1: "), ("mps", "--device mps: "),
    ("xpu", "--device xpu: "), ("warp-drive", "unknown device 'warp-drive'"),
])
def test_unavailable_device_is_one_line_before_loading(device, message):
    import torch

    backend = device.split(":")[0]
    if backend in ("cuda", "xpu", "mps") and {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                                             "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}[backend]:
        pytest.skip(f"this machine has {backend}")
    run = letterpress("generate", "x", "--device", device)  # refused before the embedded model loads
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and run.stderr.startswith("error: " + message)
    assert "Traceback" not in run.stderr


def test_serve_on_a_port_in_use_fails_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = letterpress("serve", "/no/such/folder", "--port", str(port))  # loading would say "no such folder"
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                  "(another server on that port? choose another --port)")


# ------------------------------------------------------------------------------- chat
def test_chat_from_a_pipe_is_a_transcript():
    run = letterpress("chat", "--max-new-tokens", "6", "--max-denoising-steps", "3", "--seed", "0",
                      stdin="hello there\nsecond question\n")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    first, second = out.index("you> hello there\nmodel> "), out.index("\n\nyou> second question\nmodel> ")
    assert first == 0 and second > first and out.endswith("\n\n")


def test_chat_from_a_pipe_says_when_the_history_is_too_long_and_exits_1():
    """A piped transcript whose conversation outgrows the context: the refused turns say that the earlier turns
    count and /reset starts over, the next turns still run, and the exit code is 1, not 0."""
    long = "Convert to JSON: name=Maria, city=Lisbon, age=34 " * 8
    run = letterpress("chat", "--max-denoising-steps", "2", "--seed", "0", "--max-model-len", "300",
                      stdin=f"{long}\n{long}\n/reset\n{long}\n")
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/reset starts a new conversation" in errors[0]
    assert run.stdout.count("model> ") == 3 and "Traceback" not in run.stderr
    # /exit after a refused turn ends the same way (it used to exit 0)
    refused = letterpress("chat", "--max-denoising-steps", "2", "--seed", "0", "--max-model-len", "300",
                          stdin=f"{long}\n{long}\n/exit\n")
    assert refused.returncode == 1 and "/reset starts a new conversation" in refused.stderr


def test_chat_commands_are_never_sent_to_the_model():
    """/help lists the commands, /reset says it cleared, an unknown /word is refused (it used to go to the model
    as a question and spoil the conversation); a line that only starts with a slash is a question."""
    run = letterpress("chat", "--max-new-tokens", "6", "--max-denoising-steps", "2", "--seed", "0",
                      stdin="/help\n/history\n/reset\n/etc/hosts format?\n")
    assert run.returncode == 0, run.stderr
    assert "/reset  clear the conversation" in run.stdout and "[conversation cleared]" in run.stdout
    assert "unknown command /history: /help lists them" in run.stderr
    assert run.stdout.count("model> ") == 1 and "you> /etc/hosts format?" in run.stdout


def test_a_closed_pipe_and_a_foreign_encoding_end_no_verb_with_a_traceback():
    """`letterpress chat < questions | head -n 2` ends quietly (exit 1) when head stops reading; with a cp1252
    locale, piped UTF-8 input (with a byte-order mark) is read as UTF-8 and the answers are written as UTF-8."""
    questions = "".join(f"Convert to JSON: name=Maria, city=Lisbon, age={i}\n" for i in range(200))
    chat = subprocess.Popen([sys.executable, "-m", "letterpress.cli", "chat", "--seed", "0", "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat.stdin.write(questions.encode())
    chat.stdin.close()
    chat.stdout.readline()
    chat.stdout.close()  # the reader goes away while replies are still being written
    assert chat.wait(timeout=300) == 1
    stderr = chat.stderr.read().decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "chat", "--seed", "0", "--max-denoising-steps", "2"],
                         input="\ufeffConvert to JSON: name=Ёлка, city=Lisbon, age=34\n".encode(), capture_output=True,
                         timeout=300, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert run.returncode == 0 and "Traceback" not in run.stderr.decode(), run.stderr.decode()
    assert run.stdout.decode("utf-8").startswith("you> Convert to JSON: name=Ёлка,")  # no BOM, no mojibake


def test_ctrl_c_on_a_terminal_stops_the_reply_and_chat_goes_on():
    """In a real pseudo-terminal: Ctrl-C during a reply (one made endless by the sampler flags) stops that reply
    through the engine's abort and gives the prompt back; Ctrl-C at the prompt ends chat with exit 130."""
    import pty
    import select
    import signal
    import time

    master, slave = pty.openpty()
    chat = subprocess.Popen([sys.executable, "-m", "letterpress.cli", "chat", "--threads", "1", "--seed", "0",
                             "--max-denoising-steps", "100000", "--entropy-bound", "1e-9", "--t-min", "5", "--t-max",
                             "10"], stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(token: bytes) -> bytes:
        nonlocal seen
        deadline = time.time() + 120
        while token not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.time()))
            assert ready, f"no {token!r} after {seen[-300:]!r}"
            seen += os.read(master, 4096)
        upto = seen.index(token) + len(token)
        text, seen = seen[:upto], seen[upto:]
        return text

    try:
        read_until(b"you> ")
        os.write(master, b"hello\n")
        read_until(b"model> ")
        time.sleep(1.0)  # the reply is running (it never converges with these flags)
        chat.send_signal(signal.SIGINT)
        assert b"[reply stopped: not kept in the conversation]" in read_until(b"you> ")
        chat.send_signal(signal.SIGINT)  # at the prompt: ends chat
        assert chat.wait(timeout=60) == 130
        assert "Traceback" not in chat.stderr.read().decode()
    finally:
        chat.kill()
        os.close(master)


def test_chat_prints_each_canvas_as_it_is_committed(tmp_path, monkeypatch, capsys):
    """A random tiny model with 8-token canvases writes several canvases: each one's text is on stdout before
    the next canvas is denoised. (Its random bytes rarely decode to whole characters, which the printer holds
    back, so the test decodes ids as numbers.)"""
    import io

    from letterpress.cli import main
    from letterpress.engine.scheduler import Scheduler
    from letterpress.tokenizer import Tokenizer
    from tests.train_fixtures import make_checkpoint, make_tokenizer

    model = make_checkpoint(tmp_path / "ckpt", make_tokenizer(tmp_path / "tok"))
    printed_by_step = []
    step = Scheduler.step

    def spy(self):
        outputs = step(self)
        printed_by_step.append(capsys.readouterr().out)
        return outputs

    monkeypatch.setattr(Scheduler, "step", spy)
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, **kw: "".join(f"{i} " for i in ids))
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 + 2 =\n"))
    assert main(["chat", str(model), "--max-new-tokens", "24", "--max-denoising-steps", "2", "--seed", "0"]) == 0
    stats = capsys.readouterr().err
    assert "[24 tokens, 3 canvas(es), steps 2+2+2" in stats, stats
    pieces = [out for out in printed_by_step if out]
    assert pieces[0].startswith("you> 1 + 2 =\nmodel> ")
    assert len([p for p in pieces if p.strip() and not p.startswith("you> ")]) >= 2  # canvas by canvas
    assert len("".join(pieces).split("model> ")[1].split()) == 24


def test_chat_enables_line_editing_on_a_terminal():
    run = python("import sys\nfrom letterpress.cli.chat import enable_line_editing\nenable_line_editing()\n"
                 "print('readline' in sys.modules)")
    assert run.stdout.strip() == "True"


# ------------------------------------------------------------------------------- sudoku
PUZZLE = "530070000600195000098000060800060003400800001700000002060000280000419005000080079"


@pytest.mark.parametrize("puzzle, message", [
    ("12345", "error: a Sudoku needs 81 cells (digits, 0 or . for blanks), got 5"),
    (PUZZLE[:40] + "x" + PUZZLE[41:], "error: unexpected character 'x' at position 41: "),
    ("55" + PUZZLE[2:], "error: the givens contradict each other: 5 appears twice in row 1 (cells r1c1 and r1c2)"),
    (PUZZLE[:72] + "5" + PUZZLE[73:], "error: the givens contradict each other: 5 appears twice in column 1"),
])
def test_sudoku_refuses_bad_puzzles_before_loading(puzzle, message):
    run = letterpress("sudoku", puzzle)
    assert run.returncode == 2
    assert run.stderr.startswith(message) and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_sudoku_never_prints_an_answer_that_breaks_the_rules():
    """One denoising step does not solve this puzzle: the command says so (exit 1) and prints only the givens."""
    from letterpress.apps.sudoku import format_grid

    run = letterpress("sudoku", PUZZLE, "--max-denoising-steps", "1")
    assert run.returncode == 1, run.stderr
    assert run.stdout.startswith(format_grid(PUZZLE) + "\n")
    assert run.stdout.splitlines()[-1].startswith("no valid solution found")
    assert not any(len(line) == 81 and line.isdigit() for line in run.stdout.splitlines())


def test_sudoku_says_when_a_puzzle_is_harder_than_what_the_model_learned():
    """PUZZLE has 28 givens; the shipped model's generation_config.json says what it was trained on."""
    from letterpress.apps.sudoku import trained_givens
    from letterpress.embedded import ASSETS

    low, high = trained_givens(ASSETS / "sudoku")
    run = letterpress("sudoku", PUZZLE, "--max-denoising-steps", "1")
    assert (f"note: this puzzle has 28 givens; the model was trained on puzzles with {low}-{high}, so it is harder "
            "than anything the model learned") in run.stderr and "--rule-mask helps" in run.stderr
    easy = letterpress("sudoku", SOLVED_EASY[0], "--max-denoising-steps", "1")
    assert "note:" not in easy.stderr


# an easy puzzle (50 givens) and its solution: within what every shipped Sudoku model was trained on
SOLVED_EASY = ("794003800000040359560900017009021673307695048410007090648059731901008520200174086",
               "794513862182746359563982417859421673327695148416837295648259731971368524235174986")


def test_sudoku_rule_mask_solves_a_hard_puzzle_exactly():
    """A 30-givens puzzle with the rule mask, seed 0: the unique solution, and the same forwards and backtracks
    every run (greedy; the seed draws the canvas noise)."""
    run = letterpress("sudoku", HARD_PUZZLE, "--rule-mask", "--seed", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-2] == HARD_SOLUTION
    assert lines[-1].startswith(f"valid: yes | {HARD_FORWARDS} forwards (at most 81) | ")
    assert f"| {HARD_BACKTRACKS} backtracks | rule mask |" in lines[-1]


def test_sudoku_rule_mask_out_of_forwards_prints_no_grid():
    run = letterpress("sudoku", HARD_PUZZLE, "--rule-mask", "--max-forwards", "1")
    assert run.returncode == 1
    assert run.stdout.splitlines()[-1].startswith("no valid solution found")
    assert "cells/forward" not in run.stdout  # no rate for a board not filled in
    assert not any(len(line) == 81 and line.isdigit() for line in run.stdout.splitlines())


def test_sudoku_refuses_a_model_that_is_not_a_sudoku_model():
    """It used to end in a tensor-shape traceback with --rule-mask, and a misleading max_model_len error without."""
    from letterpress.embedded import ASSETS

    for extra in (["--rule-mask"], []):
        run = letterpress("sudoku", HARD_PUZZLE, "--model", str(ASSETS / "tiny_code"), *extra)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith(f"error: {ASSETS / 'tiny_code'} is not a Sudoku model: its tokenizer does not")


def test_sudoku_rule_mask_says_when_a_puzzle_has_no_solution():
    """PUZZLE's givens admit no solution (it is the classic puzzle with two givens changed): the rule search
    proves it by running out of digits to try, and the command says so rather than that the model missed."""
    run = letterpress("sudoku", PUZZLE, "--rule-mask")
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stdout.splitlines()[-1]
    assert last.startswith("no solution: the givens admit none") and "cells/forward" not in last  # 0 forwards


HARD_PUZZLE = "004000050003000048050063000000002004005010090192007060407030005900006400500784200"
HARD_SOLUTION = "214879356673125948859463127786392514345618792192547863427931685938256471561784239"
HARD_FORWARDS, HARD_BACKTRACKS = 12, 7


# ------------------------------------------------------------------------------- the Python API's edges
def test_from_pretrained_none_is_the_embedded_model_and_encode_checks_its_input():
    import torch

    from letterpress import DiffusionGemma
    from letterpress.embedded import default_model_dir

    model = DiffusionGemma.from_pretrained()
    reference = DiffusionGemma.from_pretrained(default_model_dir())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    cache = model.new_cache(1, 16)
    for bad, message in (([2, 5, 6], "not list"), (torch.tensor([2, 5, 6]), "of shape \\[3\\]"),
                         (torch.ones(1, 3), "got torch.float32")):
        with pytest.raises(TypeError, match=message):
            model.encode(bad, cache)
    with pytest.raises(TypeError, match="canvas_ids must be"):
        model.denoise([[1, 2]], cache)


# ------------------------------------------------------------------------------- the README's own commands
def test_readme_curls_work_against_the_readme_server():
    """Every `curl` block of README.md, run as written against a server with the README's `--api-key sk-local`
    (only the address differs)."""
    import shutil
    from pathlib import Path

    if shutil.which("curl") is None:
        pytest.skip("no curl")
    from letterpress import LLM
    from letterpress.server.app import ServerConfig
    from tests.live_server import LiveServer

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "--api-key sk-local" in readme
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if b.startswith("curl ")]
    assert any("/v1/edits" in b for b in blocks) and any("/v1/chat/completions" in b for b in blocks)
    server = LiveServer(LLM(max_num_seqs=2), ServerConfig(served_model_names=["letterpress-default"],
                                                          api_key="sk-local"))
    try:
        for block in blocks:
            command = block.replace("http://127.0.0.1:8000", server.url).replace("curl ", "curl -sS -f ", 1)
            run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, (block, run.stdout, run.stderr)  # -f: an HTTP error (401, 400) fails
            assert '"error"' not in run.stdout, run.stdout
    finally:
        server.stop()
