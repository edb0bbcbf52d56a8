"""Code infilling on held-out standard-library functions: clamped-canvas infill vs generation baselines.

The tiny code model and its tokenizer were trained with the `json`, `email` and `http` packages held out, so
their functions are unseen. From them we pick body lines (single-line statements, no docstrings), blank one,
and ask each method for it:

  search   clamped canvas, several middle lengths as rows of one batch, the most confident wins (default)
  slack    clamped canvas, one row, suffix at the end of the canvas, slack ended with EOS by the model
  prefix   plain generation from the prefix alone, cut at the original line count (1 line)
  prompt   plain generation from a prompt that shows the suffix first (`strategy="prompt"`), cut likewise

Metrics: exact match (the filled line equals the original, trailing whitespace ignored), "parses" (the
filled function, dedented, passes `ast.parse`; the floor row shows how often it parses with the line simply
deleted) and tokens per forward (middle tokens / decoder row passes spent, all candidate rows included).
The gap is cut before newlines (`letterpress.infill.LineGap`), so every piece tokenizes as in the file.

    python benchmarks/infill.py [--model PATH] [--examples 40] [--max-denoising-steps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

from common import machine

from letterpress import LLM, SamplingParams
from letterpress.infill import LineGap
from letterpress.train.bpe import read_source, stdlib_module, stdlib_python_files

HELD_OUT = ("json", "email", "http")
METHODS = ("search", "slack", "prefix", "prompt")


@dataclass
class Example:
    path: str
    source_line: int  # 1-based, the blanked line in the file
    line: int  # the same line in `text` (the window of the file kept as context)
    function: tuple[int, int]  # first (decorators included) and last line of the enclosing function
    text: str
    gap: LineGap
    original: str  # the middle that was cut out ("\n" + the line)


def held_out_files(modules: tuple[str, ...] = HELD_OUT) -> list[Path]:
    return [p for p in stdlib_python_files() if stdlib_module(p) in modules]


def body_lines(tree: ast.AST) -> list[tuple[int, tuple[int, int]]]:
    """(line, function range) for every single-line, non-docstring statement in a function body."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        for i, stmt in enumerate(node.body):
            docstring = i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            simple = not isinstance(stmt, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef,
                                           ast.AsyncFunctionDef, ast.ClassDef, ast.AsyncFor, ast.AsyncWith))
            if simple and not docstring and stmt.lineno == stmt.end_lineno:
                found.append((stmt.lineno, (start, node.end_lineno)))
    return found


def examples(n: int, seed: int, context_lines: int) -> list[Example]:
    rng = random.Random(seed)
    pool = []
    for path in held_out_files():
        text = read_source(path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        pool += [(path, text, line, fn) for line, fn in body_lines(tree)]
    out = []
    for path, text, line, fn in rng.sample(pool, min(n, len(pool))):
        lines = text.splitlines(keepends=True)
        window = "".join(lines[max(0, line - 1 - context_lines):])  # keep the context within max_model_len
        offset = max(0, line - 1 - context_lines)
        gap = LineGap.cut(window, line - offset)
        original = gap.lead + lines[line - 1].rstrip("\r\n")
        out.append(Example(str(path), line, line - offset, (fn[0] - offset, fn[1] - offset), window, gap, original))
    return out


def cut_lines(text: str, lead: str, count: int = 1) -> str:
    """A generated continuation cut to `count` lines (after the newline that starts the gap)."""
    body = text[len(lead):] if lead and text.startswith(lead) else text
    return lead + "\n".join(body.split("\n")[:count])


def normalize(middle: str) -> str:
    return "\n".join(line.rstrip() for line in middle.strip("\n").split("\n"))


def parses(example: Example, middle: str) -> bool:
    filled = example.gap.fill(middle).splitlines()
    extra = len(filled) - len(example.text.splitlines())
    first, last = example.function
    source = "\n".join(filled[first - 1:last + extra])
    try:
        ast.parse(textwrap.dedent(source))
        return True
    except (SyntaxError, ValueError):
        return False


def run_method(llm: LLM, method: str, batch: list[Example], params: SamplingParams,
               max_middle: int) -> tuple[list[str], int, int, list]:
    """Middles, middle tokens, decoder row passes and (search) every candidate, for one method over the batch."""
    prefixes, suffixes = [e.gap.prefix for e in batch], [e.gap.suffix for e in batch]
    candidates: list = [None] * len(batch)
    if method in ("search", "slack", "prompt"):
        results = llm.infill_batch(prefixes, suffixes, max_middle, params, strategy=method)
        middles = [r.middle if method != "prompt" else cut_lines(r.middle, e.gap.lead) for r, e in zip(results, batch)]
        passes = sum(r.decoder_passes for r in results)
        candidates = [[vars(c) for c in r.candidates] for r in results]
    else:
        outs = llm.generate(prefixes, replace(params, max_new_tokens=max_middle))
        middles = [cut_lines(o.text, e.gap.lead) for o, e in zip(outs, batch)]
        passes = sum(o.decoder_passes for o in outs)
    tokens = sum(len(llm.tokenizer.encode(m)) for m in middles)
    return middles, tokens, passes, candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="picks the examples and seeds the sampler")
    parser.add_argument("--context-lines", type=int, default=40, help="lines of the file kept before the gap")
    parser.add_argument("--max-middle-tokens", type=int, default=None, help="default: half a canvas")
    parser.add_argument("--max-denoising-steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", default=None, help="also write per-example results here")
    parser.add_argument("--plot", default=None, help="also draw tokens per forward and exact match by method (PNG)")
    args = parser.parse_args()

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_model_len=2048)
    batch = examples(args.examples, args.seed, args.context_lines)
    params = SamplingParams(seed=args.seed, max_denoising_steps=args.max_denoising_steps)
    max_middle = args.max_middle_tokens or llm.runner.canvas_length // 2
    print(f"model: {llm.model_name}\nmachine: {machine()}\n{len(batch)} held-out lines from "
          f"{', '.join(HELD_OUT)}; max middle {max_middle} tokens; denoising steps "
          f"{args.max_denoising_steps or 'checkpoint default'}\n")
    floor = sum(parses(e, e.gap.lead) for e in batch) / len(batch)
    rows, records = [], {f"{e.path}:{e.source_line}": {"original": e.original,
                                                 "original_tokens": len(llm.tokenizer.encode(e.original))}
                         for e in batch}
    for method in args.methods:
        start = time.perf_counter()
        middles, tokens, passes, candidates = run_method(llm, method, batch, params, max_middle)
        seconds = time.perf_counter() - start
        exact = sum(normalize(m) == normalize(e.original) for m, e in zip(middles, batch)) / len(batch)
        ok = sum(parses(e, m) for m, e in zip(middles, batch)) / len(batch)
        rows.append((method, exact, ok, tokens / max(passes, 1), passes / len(batch), seconds))
        for m, e, c in zip(middles, batch, candidates):
            records[f"{e.path}:{e.source_line}"][method] = m
            if c is not None and method == "search":
                records[f"{e.path}:{e.source_line}"]["search_candidates"] = c
        print(f"  {method}: done in {seconds:.0f} s", flush=True)
    print("\n| method | exact match | parses | tokens/forward | row passes per example | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, exact, ok, tpf, passes, seconds in rows:
        print(f"| {method} | {exact:.1%} | {ok:.1%} | {tpf:.2f} | {passes:.1f} | {seconds:.0f} |")
    print(f"| (line deleted: the parse floor) | - | {floor:.1%} | - | - | - |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.plot:
        from letterpress.plots import bar_chart

        methods = [row[0] for row in rows]
        print("chart:", bar_chart(methods, {"tokens per forward": [row[3] for row in rows]}, args.plot,
                                  title=f"Infilling: tokens per forward by method ({len(batch)} held-out lines, "
                                        f"{Path(llm.model_name).name})",
                                  xlabel="method", ylabel="middle tokens per decoder row pass"))


if __name__ == "__main__":
    main()
