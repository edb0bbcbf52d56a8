"""Command line: one module per verb, each parsing its arguments, calling the library and printing.

    letterpress generate [MODEL] "prompt"     one completion, then a stats line            (cli/generate.py)
    letterpress chat [MODEL]                  interactive multi-turn chat (/reset, /exit)   (cli/chat.py)
    letterpress infill FILE [MODEL] --line N  fill the gap marked at line N                 (cli/infill.py)
    letterpress edit FILE [MODEL] --span A:B  rewrite characters A..B of FILE, keep the rest (cli/edit.py)
    letterpress serve [MODEL]                 OpenAI-compatible HTTP server                 (cli/serve.py)
    letterpress train --model CKPT --data F   fine-tune, full or LoRA                       (cli/train.py)
    letterpress merge-lora CKPT ADAPTER OUT   fold a LoRA adapter into its base checkpoint  (cli/merge_lora.py)
    letterpress quantize MODEL OUT --format F write an int8/int4/fp8 compressed-tensors checkpoint (cli/quantize.py)
    letterpress sudoku "<81 cells>"           solve a Sudoku with the embedded Sudoku model (cli/sudoku.py)

With no MODEL the embedded default model is used. MODEL is a local checkpoint folder or a Hub id.

Importing this package and building the parser imports no torch: every verb module is light at import time and
loads the engine inside its `run`, so `--help`, argument errors and shell completion are instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LetterpressError

# verb -> module in this package defining HELP, add_arguments(parser) and run(args) -> exit code
VERBS = {"generate": "generate", "chat": "chat", "infill": "infill", "edit": "edit", "serve": "serve",
         "train": "train", "merge-lora": "merge_lora", "quantize": "quantize", "sudoku": "sudoku"}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="letterpress", description="Run, serve and fine-tune block-diffusion language models (DiffusionGemma).")
    parser.add_argument("--version", action="version", version=f"letterpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in VERBS.items():
        verb = importlib.import_module(f".{module_name}", __name__)
        p = sub.add_parser(name, help=verb.HELP, description=verb.HELP)
        verb.add_arguments(p)
        p.set_defaults(run=verb.run, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LetterpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
