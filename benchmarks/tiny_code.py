"""How plausible is the embedded code model's Python? Completes held-out function signatures and checks the
completions with Python's own parser.

    python benchmarks/tiny_code.py [--model letterpress/assets/tiny_code] [--n 200] [--baseline runs/old/model]

Prompts: the first `n` distinct `def` lines (signature only, ending at its colon) of the standard library's `json`,
`email` and `http` packages, which the tiny-code recipe keeps out of training and of the tokenizer's corpus.
Each gets one canvas (`max_new_tokens` = the canvas length) with the checkpoint's default sampler, seed = index.

Figures, per model:
- `parses`: share of completions whose complete lines, after the signature, parse as Python (`ast.parse`; a
  block left open by the canvas's end is closed with `pass` before parsing, since one canvas rarely ends a
  function);
- `parsed_lines`: mean share of a completion's complete lines kept by the longest prefix that parses;
- `indented`: share whose first non-blank line is indented deeper than the `def` (a body, not a new statement);
- the held-out loss is in the training run's metrics.jsonl, not here.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress.train.bpe import read_source  # noqa: E402
from letterpress.train.recipes_builtin import TINY_CODE_DIR, TINY_CODE_HELD_OUT, tiny_code_held_out_files  # noqa: E402


def held_out_signatures(n: int, skip: int = 0) -> list[str]:
    """Distinct `def` lines of the held-out packages, dedented (the prompt a user would type), in file order."""
    sigs = (line.strip() for path in tiny_code_held_out_files() for line in read_source(path).splitlines())
    unique = list(dict.fromkeys(s for s in sigs if s.startswith("def ") and s.endswith(":")))
    return unique[skip:skip + n]


def _parses(source: str) -> bool:
    for tail in ("", "\n" + " " * 12 + "pass", "\n" + " " * 8 + "pass", "\n" + " " * 4 + "pass"):
        try:
            ast.parse(source + tail)
            return True
        except SyntaxError:
            continue
        except (ValueError, MemoryError, RecursionError):
            return False
    return False


def judge(signature: str, completion: str) -> dict:
    lines = completion.split("\n")[:-1]  # complete lines only: the text after the last newline may be cut
    body = [ln for ln in lines if ln.strip()]
    kept = 0
    for k in range(len(lines), 0, -1):
        if _parses(signature + "\n".join(lines[:k]) + "\n"):
            kept = k
            break
    first = body[0] if body else ""
    return {"parses": bool(body) and kept == len(lines), "parsed_lines": kept / len(lines) if lines else 0.0,
            "indented": len(first) - len(first.lstrip()) > 0}


def evaluate(model: str, prompts: list[str], batch: int, **sampler) -> dict:
    from letterpress import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=batch)
    outs = llm.generate(prompts, [SamplingParams(seed=i, **sampler) for i in range(len(prompts))])
    judged = [judge(p, o.text) for p, o in zip(prompts, outs)]
    return {"parses": statistics.mean(j["parses"] for j in judged),
            "parsed_lines": statistics.mean(j["parsed_lines"] for j in judged),
            "indented": statistics.mean(j["indented"] for j in judged),
            "tokens_per_forward": statistics.mean(o.tokens_per_forward for o in outs),
            "samples": [p + o.text for p, o in zip(prompts[:3], outs[:3])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TINY_CODE_DIR))
    ap.add_argument("--baseline", default=None, help="another checkpoint to judge the same way (e.g. an older run)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--skip", type=int, default=0,
                    help="start at this signature (tune sampler settings on --skip 200, report on the first 200)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--entropy-bound", type=float, default=None, help="sampler override")
    ap.add_argument("--t-min", type=float, default=None, help="sampler override")
    ap.add_argument("--t-max", type=float, default=None, help="sampler override")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="draw tokens per forward and the parse rate per model as a PNG here")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompts = held_out_signatures(args.n, args.skip)
    sampler = {k: v for k, v in (("entropy_bound", args.entropy_bound), ("t_min", args.t_min),
                                 ("t_max", args.t_max)) if v is not None}
    print(f"{len(prompts)} held-out signatures from {', '.join(TINY_CODE_HELD_OUT)}", flush=True)
    results = {}
    for name, model in (("model", args.model), ("baseline", args.baseline)):
        if not model:
            continue
        r = evaluate(model, prompts, args.batch, **sampler)
        results[name] = {"path": model, **{k: v for k, v in r.items() if k != "samples"}}
        print(f"{name:8s} {model}: parses {100 * r['parses']:.1f}% | parsed lines {100 * r['parsed_lines']:.1f}% | "
              f"body indented {100 * r['indented']:.1f}% | {r['tokens_per_forward']:.2f} tokens/forward", flush=True)
        for s in r["samples"]:
            print("  ---\n  " + s.replace("\n", "\n  "))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        from letterpress.plots import bar_chart

        names = [f"{name}: {Path(r['path']).name or r['path']}" for name, r in results.items()]
        print("chart:", bar_chart(names, {"tokens per forward": [r["tokens_per_forward"] for r in results.values()]},
                                  args.plot, xlabel="checkpoint", ylabel="tokens per forward (mean per completion)",
                                  title=f"Code completion: tokens per forward ({len(prompts)} held-out signatures)"))


if __name__ == "__main__":
    main()
