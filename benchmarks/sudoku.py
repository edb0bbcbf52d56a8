"""Sudoku case study: solve rate of the diffusion model vs its autoregressive baseline on held-out puzzles.

Train the two models first (CPU; settings and costs in BENCHMARKS.md, "Sudoku"):

    OMP_NUM_THREADS=1 letterpress train --recipe sudoku --output runs/sudoku        # shipped as assets/sudoku
    OMP_NUM_THREADS=1 letterpress train --recipe sudoku-ar --output runs/sudoku-ar

then

    python benchmarks/sudoku.py [--model letterpress/assets/sudoku] [--ar-model runs/sudoku-ar/model] [--n 1000]

The held-out puzzles are `letterpress.train.recipes_builtin.held_out_puzzles()`: their own seed, checked here not
to occur in the training stream (puzzle or solution grid). A puzzle counts as solved when the output is
complete, valid and consistent with the givens (`letterpress.sudoku.is_solution`).

Diffusion: `LLM.generate` over batches of puzzles, greedy proposals (argmax; the accept/re-noise schedule of the
checkpoint's generation_config.json). Autoregressive: greedy decoding, `model.encode` one token at a time and
`model.lm_logits`, 81 forwards per puzzle (1 token/forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress import sudoku as S  # noqa: E402
from letterpress.train import recipes_builtin as RB  # noqa: E402


def eval_diffusion(model_dir: str | Path, puzzles: list[str], batch: int = 100, greedy: bool = True,
                   seed: int = 0, **params) -> dict:
    from letterpress import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=batch, max_model_len=256)
    solved, steps, tpf, tokens, passes, outputs = 0, [], [], 0, 0, []
    start = time.perf_counter()
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        sp = [SamplingParams(seed=seed + i + k, greedy=greedy, **params) for k in range(len(chunk))]
        for p, out in zip(chunk, llm.generate(chunk, sp)):
            ok = S.is_solution(out.text, p)
            solved += ok
            steps.append(sum(out.steps_per_canvas))
            tpf.append(out.tokens_per_forward)
            tokens += len(out.token_ids) + (out.finish_reason == "stop")
            passes += out.decoder_passes
            outputs.append(out.text)
    seconds = time.perf_counter() - start
    return {"solved": solved, "n": len(puzzles), "solve_rate": solved / len(puzzles),
            "mean_steps": statistics.mean(steps), "median_steps": statistics.median(steps),
            "tokens_per_forward": statistics.mean(tpf), "tokens_per_forward_pooled": tokens / max(passes, 1),
            "seconds": seconds, "outputs": outputs}


@torch.no_grad()
def eval_autoregressive(model_dir: str | Path, puzzles: list[str], batch: int = 100) -> dict:
    from letterpress.model import DiffusionGemma
    from letterpress.tokenizer import Tokenizer

    model = DiffusionGemma.from_pretrained(model_dir)
    model.eval()
    tok = Tokenizer.from_dir(model_dir)
    solved, outputs = 0, []
    start = time.perf_counter()
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        ids = torch.tensor([tok.encode(p, add_special_tokens=True) for p in chunk])  # all 82 tokens long
        cache = model.new_cache(len(chunk), ids.shape[1] + 82)
        hidden = model.encode(ids, cache)[:, -1]
        out = []
        for _ in range(81):
            nxt = model.lm_logits(hidden).argmax(-1)
            out.append(nxt)
            hidden = model.encode(nxt[:, None], cache)[:, -1]
        rows = torch.stack(out, 1).tolist()
        for p, row in zip(chunk, rows):
            text = tok.decode(row)
            solved += S.is_solution(text, p)
            outputs.append(text)
    return {"solved": solved, "n": len(puzzles), "solve_rate": solved / len(puzzles), "tokens_per_forward": 1.0,
            "forwards_per_puzzle": 81, "seconds": time.perf_counter() - start, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(RB.SUDOKU_DIR), help="the diffusion model (default: the shipped one)")
    ap.add_argument("--ar-model", default="runs/sudoku-ar/model", help="the autoregressive baseline ('' to skip)")
    ap.add_argument("--n", type=int, default=1000, help="held-out puzzles (at most 1000 are held out)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sample", action="store_true", help="sample the proposals instead of taking the argmax")
    ap.add_argument("--no-check", action="store_true", help="skip the held-out vs training-stream collision check")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    held = RB.held_out_puzzles(1000)[:args.n]
    if not args.no_check:
        RB.check_disjoint(RB.sudoku_training_pairs(0), held)
        print(f"checked: none of the {len(held)} held-out puzzles occurs in the training stream", flush=True)
    puzzles = [p for p, _ in held]
    blanks = [p.count("0") for p in puzzles]
    print(f"{len(puzzles)} held-out puzzles, {RB.SUDOKU_GIVENS[0]}-{RB.SUDOKU_GIVENS[1]} givens "
          f"(mean blanks {statistics.mean(blanks):.1f})", flush=True)
    results = {}
    d = eval_diffusion(args.model, puzzles, args.batch, greedy=not args.sample)
    results["diffusion"] = d
    print(f"diffusion   : solved {d['solved']}/{d['n']} ({100 * d['solve_rate']:.1f}%), mean steps "
          f"{d['mean_steps']:.2f}, tokens/forward {d['tokens_per_forward']:.2f}, {d['seconds']:.0f} s", flush=True)
    if args.ar_model:
        a = eval_autoregressive(args.ar_model, puzzles, args.batch)
        results["autoregressive"] = a
        print(f"autoregress.: solved {a['solved']}/{a['n']} ({100 * a['solve_rate']:.1f}%), 81 forwards/puzzle, "
              f"1.00 tokens/forward, {a['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "outputs"}
                                               for k, v in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
