"""Sudoku case study: solve rate of the diffusion model vs its autoregressive baseline on held-out puzzles.

Train the two models first (CPU; settings and costs in BENCHMARKS.md, "Sudoku"):

    OMP_NUM_THREADS=1 letterpress train --recipe sudoku --output runs/sudoku        # shipped as assets/sudoku
    OMP_NUM_THREADS=1 letterpress train --recipe sudoku-ar --output runs/sudoku-ar

then

    python benchmarks/sudoku.py [--model letterpress/assets/sudoku] [--ar-model runs/sudoku-ar/model] [--n 1000] \
        [--json sudoku.json] [--plot solve_by_givens.png]

The held-out puzzles are `letterpress.train.recipes_builtin.held_out_puzzles()`: their own seed, checked here not
to occur in the training stream (puzzle or solution grid). A puzzle counts as solved when the output is
complete, valid and consistent with the givens (`letterpress.apps.sudoku.is_solution`).

Per-bucket mode (`--buckets 22-40`, the difficulty people play): `--n` held-out puzzles with exactly g givens for
each g (`recipes_builtin.bucket_puzzles`: seed 888,000 + g; kept under --cache-dir once made), solved by each of
`--methods`: the plain samplers, the rule mask with backtracking (`--rule-mask` of `letterpress sudoku`;
letterpress/apps/sudoku_rules.py) within `--max-forwards` forwards per puzzle, and the mask's search fed uniform
proposals (no model: the control). Prints a markdown table with forwards used and 95% Wilson intervals:

    python benchmarks/sudoku.py --buckets 22-40 --n 200 --ar-model runs/sudoku-ar/model \
        --json sudoku_buckets.json --plot solve_by_givens_hard.png

The prompt is the puzzle's 81 cell words (`letterpress.apps.sudoku.prompt_text`). Diffusion: `LLM.run` over batches of puzzles, greedy proposals (argmax; the accept/re-noise schedule of the
checkpoint's generation_config.json). Autoregressive: greedy decoding, `model.encode` one token at a time and
`model.lm_logits`, 81 forwards per puzzle (1 token/forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress.apps.sudoku_solve import solve_autoregressive, solve_diffusion  # noqa: E402
from letterpress.train import recipes_builtin as RB  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(RB.SUDOKU_DIR), help="the diffusion model (default: the shipped one)")
    ap.add_argument("--ar-model", default="runs/sudoku-ar/model", help="the autoregressive baseline ('' to skip)")
    ap.add_argument("--n", type=int, default=1000, help="held-out puzzles (at most 1000 are held out)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sample", action="store_true", help="sample the proposals instead of taking the argmax")
    ap.add_argument("--no-check", action="store_true", help="skip the held-out vs training-stream collision check")
    ap.add_argument("--entropy-bound", type=float, default=None, help="sampler override (default: the checkpoint's)")
    ap.add_argument("--max-denoising-steps", type=int, default=None, help="sampler override")
    ap.add_argument("--stability-threshold", type=int, default=None, help="sampler override")
    ap.add_argument("--confidence-threshold", type=float, default=None, help="sampler override")
    ap.add_argument("--validation", action="store_true",
                    help="use the validation puzzles (their own seed) instead of the held-out ones: for tuning")
    ap.add_argument("--buckets", default=None, metavar="LO-HI",
                    help="per-bucket mode: --n held-out puzzles with exactly g givens for each g in LO-HI (e.g. 22-40), "
                         "each bucket its own seed; see run_buckets")
    ap.add_argument("--methods", default="diffusion,diffusion+mask,rules-only,ar,ar+mask",
                    help="per-bucket mode: which solvers (diffusion and ar: the plain samplers; +mask: with the rule "
                         "mask and backtracking; rules-only: the mask's search fed uniform proposals, no model)")
    ap.add_argument("--max-forwards", type=int, default=81,
                    help="per-bucket mode: the forward budget per puzzle of the +mask and rules-only solvers")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "letterpress" / "sudoku_buckets"),
                    help="per-bucket mode: generated puzzles are kept here (22 givens takes seconds a puzzle)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--plot", default=None, help="draw the solve rate by number of givens as a PNG here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.buckets:
        return run_buckets(args)
    held = (RB.validation_puzzles(args.n) if args.validation else RB.held_out_puzzles(1000))[:args.n]
    if not args.no_check:
        for seed, givens in RB.SUDOKU_STREAMS:
            RB.check_disjoint(RB.sudoku_training_pairs(seed, givens=givens), held)
        print(f"checked: none of the {len(held)} puzzles occurs in the training streams (seeds "
              f"{', '.join(str(seed) for seed, _ in RB.SUDOKU_STREAMS)})", flush=True)
    puzzles = [p for p, _ in held]
    blanks = [p.count("0") for p in puzzles]
    print(f"{len(puzzles)} {'validation' if args.validation else 'held-out'} puzzles, {RB.SUDOKU_GIVENS[0]}-{RB.SUDOKU_GIVENS[1]} givens "
          f"(mean blanks {statistics.mean(blanks):.1f})", flush=True)
    results = {}
    overrides = {k: getattr(args, k) for k in ("entropy_bound", "max_denoising_steps", "stability_threshold",
                                               "confidence_threshold") if getattr(args, k) is not None}
    d = solve_diffusion(args.model, puzzles, args.batch, greedy=not args.sample, **overrides)
    results["diffusion"] = d
    print(f"diffusion   : solved {d['solved']}/{d['n']} ({100 * d['solve_rate']:.1f}%), mean steps "
          f"{d['mean_steps']:.2f}, tokens/forward {d['tokens_per_forward']:.2f}, {d['seconds']:.0f} s", flush=True)
    if args.ar_model:
        a = solve_autoregressive(args.ar_model, puzzles, args.batch)
        results["autoregressive"] = a
        print(f"autoregress.: solved {a['solved']}/{a['n']} ({100 * a['solve_rate']:.1f}%), 81 forwards/puzzle, "
              f"1.00 tokens/forward, {a['seconds']:.0f} s", flush=True)
    by_givens = {name: solve_rate_by_givens(puzzles, r["outputs"]) for name, r in results.items()}
    for name, rates in by_givens.items():
        print(f"{name} by givens: " + ", ".join(f"{g}: {100 * rate:.0f}% of {n}" for g, (rate, n) in rates.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({k: {**{kk: vv for kk, vv in v.items() if kk != "outputs"},
                                                   "by_givens": by_givens[k]}
                                               for k, v in results.items()}, indent=2) + "\n")
    if args.plot:
        from letterpress.plots import bar_chart

        buckets = sorted({g for rates in by_givens.values() for g in rates}, key=int)
        series = {f"{name} ({100 * results[name]['solve_rate']:.1f}% overall)":
                  [rates.get(g, (0.0, 0))[0] for g in buckets] for name, rates in by_givens.items()}
        print("chart:", bar_chart(buckets, series, args.plot, percent=True, xlabel="givens (filled cells)",
                                  ylabel="puzzles solved", title=f"Sudoku: solve rate by givens ({len(puzzles)} "
                                  f"{'validation' if args.validation else 'held-out'} puzzles)"))


METHOD_NAMES = {"diffusion": "diffusion", "diffusion+mask": "diffusion + rule mask",
                "rules-only": "rule mask alone (uniform proposals)", "ar": "autoregressive",
                "ar+mask": "autoregressive + rule mask"}


def bucket_set(givens: int, n: int, cache_dir: str) -> list[tuple[str, str]]:
    """The first n held-out puzzles of a bucket, generated once and kept under `cache_dir`."""
    path = Path(cache_dir) / f"givens{givens}_seed{RB.SUDOKU_BUCKET_SEED + givens}.json"
    cached = json.loads(path.read_text()) if path.exists() else []
    if len(cached) < n:
        cached = [list(pair) for pair in RB.bucket_puzzles(givens, n)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached))
    return [tuple(pair) for pair in cached[:n]]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def percent_interval(low: float, high: float) -> str:
    """An interval of proportions as "low-high" in percent: whole numbers, or as many decimals (up to 6) as it
    takes for a bound strictly between 0 and 100% not to print as 0 or 100, and for different bounds not to
    print alike (1000/1000: "99.6-100", not "100-100"; 0/1000: "0-0.4")."""
    def text(x: float, decimals: int) -> str:
        return f"{100 * x:.{decimals}f}"

    def honest(x: float, decimals: int) -> bool:  # 0 and 100 are printed only when exact
        return float(text(x, decimals)) not in (0.0, 100.0) or x in (0.0, 1.0)

    d_low = next((d for d in range(6) if honest(low, d)), 6)
    d_high = next((d for d in range(6) if honest(high, d)), 6)
    while low < high and text(low, d_low) == text(high, d_high) and max(d_low, d_high) < 6:
        d_low, d_high = d_low + 1, d_high + 1
    return f"{text(low, d_low)}-{text(high, d_high)}"


def run_buckets(args) -> None:
    """Solve rate per number of givens (the difficulty people play: 22-40), each solver on the same puzzles.

    diffusion / ar: the plain samplers (`solve_diffusion` with the checkpoint's settings, at most 48 denoising
    steps; `solve_autoregressive`, 81 forwards). +mask: `solve_diffusion_ruled` / `solve_autoregressive_ruled`
    (letterpress/apps/sudoku_rules.py) within --max-forwards forwards per puzzle. rules-only: the same search
    with uniform proposals, the control that says what the rules and backtracking do without a model."""
    from letterpress.apps.sudoku_solve import (solve_autoregressive_ruled, solve_diffusion_ruled,
                                               solve_rules_only)

    lo, hi = (int(v) for v in args.buckets.split("-"))
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHOD_NAMES)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHOD_NAMES)}")
    if not args.ar_model or not Path(args.ar_model).exists():
        methods = [m for m in methods if not m.startswith("ar")]
    overrides = {k: getattr(args, k) for k in ("entropy_bound", "max_denoising_steps", "stability_threshold",
                                               "confidence_threshold") if getattr(args, k) is not None}
    bound = args.entropy_bound if args.entropy_bound is not None else 0.01
    table: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for givens in range(lo, hi + 1):
        puzzles = [p for p, _ in bucket_set(givens, args.n, args.cache_dir)]
        for m in methods:
            if m == "diffusion":
                r = solve_diffusion(args.model, puzzles, args.batch, greedy=not args.sample, **overrides)
                r["mean_forwards"] = r["mean_steps"]
            elif m == "diffusion+mask":
                r = solve_diffusion_ruled(args.model, puzzles, args.batch, args.max_forwards, bound)
            elif m == "rules-only":
                r = solve_rules_only(puzzles, args.max_forwards, bound)
            elif m == "ar":
                r = solve_autoregressive(args.ar_model, puzzles, args.batch)
                r["mean_forwards"] = 81.0
            else:
                r = solve_autoregressive_ruled(args.ar_model, puzzles, args.batch, args.max_forwards)
            low, high = wilson(r["solved"], r["n"])
            table[m][str(givens)] = {"solved": r["solved"], "n": r["n"], "solve_rate": r["solve_rate"],
                                     "ci95": [low, high], "mean_forwards": r["mean_forwards"],
                                     "seconds": r["seconds"]}
            print(f"{givens} givens | {METHOD_NAMES[m]:<36}: {r['solved']:4d}/{r['n']} ({100 * r['solve_rate']:5.1f}%, "
                  f"95% CI {percent_interval(low, high)}%), {r['mean_forwards']:.1f} forwards, "
                  f"{r['seconds']:.0f} s", flush=True)
    print("\n| givens | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |")
    print("|---|" + "---:|" * len(methods))
    for givens in range(lo, hi + 1):
        cells = []
        for m in methods:
            c = table[m][str(givens)]
            cells.append(f"{100 * c['solve_rate']:.1f}% ({c['mean_forwards']:.1f} fw)")
        print(f"| {givens} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_per_bucket": args.n, "max_forwards": args.max_forwards,
                                               "entropy_bound": bound, "model": str(args.model),
                                               "ar_model": args.ar_model, "by_givens": table}, indent=2) + "\n")
    if args.plot:
        from letterpress.plots import line_chart

        xs = list(range(lo, hi + 1))
        print("chart:", line_chart(xs, {METHOD_NAMES[m]: [table[m][str(g)]["solve_rate"] for g in xs] for m in methods},
                                   args.plot, percent=True, xlabel="givens (filled cells)", ylabel="puzzles solved",
                                   title=f"Sudoku: solve rate by givens ({args.n} held-out puzzles per bucket)"))


def solve_rate_by_givens(puzzles: list[str], outputs: list[str]) -> dict[str, tuple[float, int]]:
    """{"50": (solve rate, puzzles), ...} per number of givens, hardest (fewest givens) first."""
    from letterpress.apps.sudoku import is_solution

    buckets: dict[int, list[bool]] = {}
    for puzzle, output in zip(puzzles, outputs):
        buckets.setdefault(81 - puzzle.count("0"), []).append(is_solution(output, puzzle))
    return {str(givens): (sum(ok) / len(ok), len(ok)) for givens, ok in sorted(buckets.items())}


if __name__ == "__main__":
    main()
