"""Command line: argument parsing and printing only; the work is done by `letterpress.LLM` and friends.

    letterpress generate [MODEL] "prompt"     one completion, then a stats line
    letterpress chat [MODEL]                  interactive multi-turn chat (/reset, /exit)
    letterpress infill FILE [MODEL] --line N  fill the gap marked at line N (README, "Infilling and editing")
    letterpress edit FILE [MODEL] --span A:B  rewrite characters A..B of FILE, keep the rest
    letterpress serve [MODEL]                 OpenAI-compatible HTTP server (see README, "Serving")
    letterpress train --model CKPT --data F   fine-tune, full or LoRA (see README, "Fine-tuning")
    letterpress merge-lora CKPT ADAPTER OUT   fold a LoRA adapter into its base checkpoint
    letterpress sudoku "<81 cells>"           solve a Sudoku with the embedded Sudoku model, step by step

With no MODEL the embedded default model is used. MODEL is a local checkpoint folder or a Hub id.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from .errors import LetterpressError
from .infill_cli import edit_arguments, infill_arguments, run_edit, run_infill
from .server.launch import run_serve, serve_arguments  # light: fastapi/uvicorn load inside run_serve
from .sudoku_cli import run_sudoku, sudoku_arguments
from .train.command import merge_lora_arguments, run_merge_lora, run_train, train_arguments

def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16, float16, or auto (the checkpoint's own dtype, from config.json)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--offline", action="store_true", help="never touch the network (Hub cache only)")
    p.add_argument("--max-model-len", type=int, default=None, help="context budget per request (tokens)")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (README, 'Performance' and 'Quantization')")
    g.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                   help="weight-only quantization of the linear layers and experts (default: none)")
    g.add_argument("--impl", choices=["plain", "fast"], default="plain",
                   help="plain: the reference path (default); fast: grouped MoE, sliced attention, fused sampler")
    g.add_argument("--compile", action="store_true", help="torch.compile the layers (slow first steps)")
    g.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs; untested)")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch profiler trace (chrome trace JSON) of the first --profile-steps steps to DIR")
    g.add_argument("--profile-steps", type=int, default=8, metavar="N", help="steps to profile (default 8)")


def engine_options(args: argparse.Namespace) -> dict:
    """`LLM` keyword arguments from `add_engine_arguments`."""
    compile_ = (getattr(args, "compile_mode", None) or True) if getattr(args, "compile", False) else False
    return dict(quantization=getattr(args, "quantization", None), impl=getattr(args, "impl", "plain"),
                compile=compile_)


def attach_profiler(llm, args: argparse.Namespace) -> None:
    if getattr(args, "profile", None):
        from .profiling import StepProfiler

        StepProfiler(args.profile, args.profile_steps).attach(llm.runner)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--max-denoising-steps", type=int, default=None)
    g.add_argument("--entropy-bound", type=float, default=None)
    g.add_argument("--t-min", type=float, default=None)
    g.add_argument("--t-max", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="fixes the output (per-request generator)")


def sampling_params(args: argparse.Namespace):
    from .engine.request import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.max_denoising_steps,
                          entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max, seed=args.seed)


def load_llm(model: str | None, args: argparse.Namespace):
    from .engine.llm import LLM

    llm = LLM(model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              offline=True if args.offline else None, max_num_seqs=1, **engine_options(args))
    attach_profiler(llm, args)
    return llm


def stats_line(out, seconds: float) -> str:
    steps = "+".join(str(s) for s in out.steps_per_canvas)
    rate = len(out.token_ids) / seconds if seconds > 0 else 0.0
    return (f"[{len(out.token_ids)} tokens, {out.canvases} canvas(es), steps {steps}, "
            f"{out.tokens_per_forward:.2f} tokens/forward, {rate:.1f} tokens/s, finish: {out.finish_reason}]")


def split_model_and_text(words: list[str], parser: argparse.ArgumentParser) -> tuple[str | None, str]:
    if len(words) == 1:
        return None, words[0]
    if len(words) == 2:
        return words[0], words[1]
    parser.error('expected [MODEL] "prompt"')
    raise AssertionError


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="+", metavar='[MODEL] "prompt"', help="checkpoint folder or Hub id (optional), then the prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run_generate(args: argparse.Namespace) -> int:
    model, prompt = split_model_and_text(args.words, args.parser)
    llm = load_llm(model, args)
    params = sampling_params(args)
    printer = CanvasPrinter(llm.tokenizer)
    start = time.perf_counter()
    if args.chat_template:
        out = llm.chat([{"role": "user", "content": prompt}], params, listener=printer)[0]
    else:
        out = llm.generate(prompt, params, listener=printer)[0]
    seconds = time.perf_counter() - start
    print()
    print(stats_line(out, seconds), file=sys.stderr)
    return 0


class CanvasPrinter:
    """Prints each canvas's text as soon as the canvas is committed, so long generations show progress.
    Decodes the cumulative ids and prints the new suffix (a canvas may end inside a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, event) -> None:
        if not event.final:
            return
        self.ids.extend(event.token_ids)
        if self.tokenizer is None:
            text = " ".join(map(str, self.ids)) + " "
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return  # wait for the rest of the character
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--system", default=None, help="a system prompt")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run_chat(args: argparse.Namespace) -> int:
    llm = load_llm(args.model, args)
    params = sampling_params(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"letterpress chat with {llm.model_name}: /reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        start = time.perf_counter()
        try:
            out = llm.chat(history, params)[0]
        except LetterpressError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": out.text})
        print(("model> " if interactive else "") + out.text)
        print(stats_line(out, time.perf_counter() - start), file=sys.stderr)


# name -> (help, add arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("complete one prompt", generate_arguments, run_generate),
    "chat": ("interactive multi-turn chat", chat_arguments, run_chat),
    "infill": ("fill a marked gap (a `...` or `# fill` line) in a file", infill_arguments, run_infill),
    "edit": ("rewrite character spans of a file, keeping the rest", edit_arguments, run_edit),
    "serve": ("OpenAI-compatible HTTP server", serve_arguments, run_serve),
    "train": ("fine-tune (full or LoRA) or train a model on JSONL data", train_arguments, run_train),
    "merge-lora": ("fold a LoRA adapter into its base checkpoint", merge_lora_arguments, run_merge_lora),
    "sudoku": ("solve a Sudoku with the embedded Sudoku model, step by step", sudoku_arguments, run_sudoku),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letterpress", description=__doc__.split("\n\n")[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"letterpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(run=run, parser=p)
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


if __name__ == "__main__":
    sys.exit(main())
