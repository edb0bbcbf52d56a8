"""Charts of figures already recorded in BENCHMARKS.md, redrawn without rerunning anything (seconds, no model).

    python benchmarks/charts.py [--out benchmarks/charts]

Each chart's numbers are copied here from the BENCHMARKS.md section named beside them, measured by the command
given there; a rerun of that benchmark with its `--plot PATH` option draws the same chart from fresh figures.
When a section's table changes, change the numbers here with it and rerun this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress.plots import bar_chart, curves, line_chart  # noqa: E402

# "Serving": python benchmarks/serve_load.py --max-denoising-steps 8 --duration 40 (2-core CPU sandbox, the
# embedded placeholder model then, 64-token requests)
SERVE = {"concurrency": [1, 8, 32], "tokens/s": [249.6, 365.6, 288.5]}

# "Sudoku", solve rate on the first 100 held-out puzzles during training (the recipes' eval hook, every 500 steps):
# the diffusion run (4,000 steps, then +1,500 from it) and the autoregressive baseline (4,760 steps)
SUDOKU_TRAINING = {
    "diffusion (sudoku, then sudoku-more)": ([500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000, 5500],
                                             [0, 1, 14, 46, 49, 67, 80, 84, 72, 79, 85]),
    "autoregressive baseline (sudoku-ar)": ([500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 4760],
                                            [0, 1, 4, 10, 13, 20, 24, 25, 30, 32]),
}

# Tokens per forward of the shipped models on their own tasks: "Sudoku" (shipped model, 1,000 held-out puzzles,
# and the autoregressive baseline), "Embedded models" (tiny-code, 200 held-out def signatures, as shipped; tiny-tasks,
# the default model after the copying and polishing stages, 100 held-out per family, int8 as shipped: the mean over
# its 11 families)
TOKENS_PER_FORWARD = {"Sudoku\n(shipped sudoku model)": 31.20,
                      "reformatting tasks, mean\n(shipped tiny-tasks)": 9.13,
                      "code completion\n(shipped tiny-code)": 1.17,
                      "Sudoku, autoregressive\nbaseline (1 per forward)": 1.00}


# "Sudoku at 22-40 givens": the per-bucket figures of the shipped model (benchmarks/sudoku.py --buckets, recorded
# in this JSON by the runs named in BENCHMARKS.md)
SUDOKU_BUCKETS = ROOT / "benchmarks" / "charts" / "sudoku_buckets.json"
SUDOKU_METHODS = {"diffusion+mask": "diffusion + rule mask (<= 81 forwards)",
                  "rules-only": "rule mask alone, uniform proposals (control)", "diffusion": "diffusion, plain sampler",
                  "ar+mask": "autoregressive baseline + rule mask (<= 81 forwards)",
                  "ar": "autoregressive baseline, plain (81 forwards)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "charts"), help="folder for the PNGs")
    out = Path(ap.parse_args().out)
    made = [
        line_chart(SERVE["concurrency"], {"tokens/s": SERVE["tokens/s"]}, out / "serve_throughput.png",
                   title="letterpress serve: throughput (2-core CPU, 64-token requests)",
                   xlabel="concurrent clients", ylabel="completion tokens per second", log_x=True),
        _training_curves(out / "sudoku_training.png"),
        _bucket_chart(out / "sudoku_solve_by_givens_hard.png"),
        bar_chart(list(TOKENS_PER_FORWARD), {"tokens per forward": list(TOKENS_PER_FORWARD.values())},
                  out / "tokens_per_forward.png", title="Tokens per forward by task (shipped models)",
                  xlabel="task (model)", ylabel="tokens per decoder forward"),
    ]
    for path in made:
        print(path)


def _training_curves(path: Path) -> Path:
    """Solve rate against training compute, 1.0 = the 4,000-step diffusion run: a diffusion step costs 582
    token-passes per example, an autoregressive one 489 (the "training compute" row of the Sudoku table)."""
    per_step = {"diffusion": 582 / (582 * 4000), "autoregressive": 489 / (582 * 4000)}
    series = {name: ([s * per_step[name.split()[0]] for s in steps], [r / 100 for r in rates])
              for name, (steps, rates) in SUDOKU_TRAINING.items()}
    return curves(series, path, percent=True, marks={"diffusion continued (sudoku-more)": 1.0},
                  title="Sudoku: solve rate during training (first 100 held-out puzzles)",
                  xlabel="training compute (1.0 = 4,000 diffusion steps x 16 puzzles = 4,760 autoregressive steps)",
                  ylabel="puzzles solved")


def _bucket_chart(path: Path) -> Path:
    import json

    rows = json.loads(SUDOKU_BUCKETS.read_text())["by_givens"]
    givens = sorted(rows, key=int)
    series = {label: [rows[g][m]["solve_rate"] for g in givens] for m, label in SUDOKU_METHODS.items()
              if all(m in rows[g] for g in givens)}  # a method measured in every bucket
    return line_chart([int(g) for g in givens], series, path, percent=True, xlabel="givens (filled cells)",
                      ylabel="puzzles solved", title="Sudoku at 22-40 givens: shipped model vs autoregressive baseline")


if __name__ == "__main__":
    main()
