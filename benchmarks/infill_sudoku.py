"""Do clamped canvases stay in distribution for a *trained* model? Sudoku: the givens clamped into the canvas.

The Sudoku model is trained with the puzzle as the prompt and the 81-digit solution as the canvas (then EOS
fill). Clamping the givens at their cells of the solution canvas (and optionally the EOS fill) is the same
thing infilling does with a suffix: known tokens that the sampler never changes. If clamps pushed the model
out of its training distribution, the blank cells would get worse; they should not.

    python benchmarks/infill_sudoku.py [--model runs/sudoku/model] [--puzzles 200]
"""

from __future__ import annotations

import argparse

from common import machine

from letterpress import LLM, SamplingParams
from letterpress.apps import sudoku as S
from letterpress.apps.sudoku_solve import prompt_ids
from letterpress.sampling import Clamp
from letterpress.train.recipes_builtin import held_out_puzzles

MODES = ("prompt only", "givens clamped", "givens + EOS fill clamped")


def rows(llm: LLM, puzzles: list[str], mode: str, params: SamplingParams) -> list:
    tok, canvas = llm.tokenizer, llm.runner.canvas_length
    eos = llm.defaults.eos_token_ids[0]
    requests = []
    for puzzle in puzzles:
        clamps = None
        if mode != "prompt only":
            pinned = [d if ch != "0" else None for d, ch in zip(tok.encode(puzzle), puzzle)]
            pinned += [eos if mode.endswith("fill clamped") else None] * (canvas - 81)
            clamps = [Clamp.of(pinned)]
        requests.append(llm.make_request(prompt_ids(tok, puzzle), params, clamps=clamps))
    return requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="letterpress/assets/sudoku", help="a trained Sudoku checkpoint folder")
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=32, max_model_len=256)
    pairs = held_out_puzzles(args.puzzles)
    print(f"model: {args.model}\nmachine: {machine()}\n{len(pairs)} held-out puzzles, checkpoint sampler defaults\n")
    print("| canvas | solved | blank cells right | givens right | mean denoising steps |\n|---|---:|---:|---:|---:|")
    for mode in MODES:
        outs = llm.run(rows(llm, [p for p, _ in pairs], mode, SamplingParams(seed=args.seed)))
        grids = [llm.tokenizer.decode(o.token_ids[:81]).replace(" ", "").ljust(81, "?") for o in outs]
        solved = sum(S.is_solution(g, p) for g, (p, _) in zip(grids, pairs))
        blank = [g[i] == s[i] for g, (p, s) in zip(grids, pairs) for i in range(81) if p[i] == "0"]
        given = [g[i] == s[i] for g, (p, s) in zip(grids, pairs) for i in range(81) if p[i] != "0"]
        steps = sum(o.decoder_passes for o in outs) / len(outs)
        print(f"| {mode} | {solved / len(pairs):.1%} | {sum(blank) / len(blank):.1%} | {sum(given) / len(given):.1%} "
              f"| {steps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
