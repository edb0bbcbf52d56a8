"""The GPU run issue 16's item 1 waits for: the arithmetic and sorting probes at a scale a CPU session cannot give.

    python benchmarks/gpu_tiny_tasks.py --out runs/gpu-probes                      # one H100 / H200, ~8 minutes
    python benchmarks/gpu_tiny_tasks.py --probes sort-direct-big --minutes 6 ...   # one probe, more steps
    python benchmarks/gpu_tiny_tasks.py --device cpu --tiny --out /tmp/dry         # the dry run a test does

On the 2-core CPU of every session so far, a fresh model of the default's shape learnt the times table (88
facts) and not the sums and differences of the arithmetic family (6.5% of 200 held-out after 384,000 examples,
`arith-direct-big`) nor the ordering of numbers (sort_dedup: 29.5% after 96,000 examples, lists of numbers 0 of
80, `sort-direct`); BENCHMARKS.md, "Compute probe" and "Sorting probe". Whether more examples teach them is the
question this answers, one probe at a time:

1. a calibration run (`letterpress train --recipe P --stop-after-steps 20`, thrown away) gives the seconds a
   step and the start-up cost on this machine;
2. the run itself gets as many steps as fit its share of `--minutes` (the steps' time; building the stream, the
   calibration and the scoring come on top, ~2 minutes a probe on a 2-core CPU), a whole warmup and cosine
   (`letterpress train --recipe P --steps S`; batch and stream as the recipe says: 1,024 examples a step for
   arithmetic at canvas 8, 512 for sorting at canvas 40);
3. `benchmarks/default_model.py --families F --n 200` scores the probe's 200 held-out prompts (kept out of its
   stream), and for arithmetic `benchmarks/times_table.py` the 88 products (recall, against computing).

Prints one table beside the CPU figures and writes `--out`/gpu_tiny_tasks.json. A probe that reaches 95% says
the default's recipe needs a GPU run of that size (`--recipe tiny-tasks --device cuda`); one that does not
says the formulation, not compute, is what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GpuProbe:
    family: str
    batch: int  # examples a step on the GPU
    # The calibration times steps of the probe's small sibling at the same batch and canvas: the same step, and a
    # stream a tenth as long to build (drawing and rendering 150,000 tasks takes minutes of one CPU core).
    calibration: tuple[str, ...]
    cpu_examples: int  # what the CPU run gave (BENCHMARKS.md): examples seen, held-out exact
    cpu_exact: float


PROBES = {
    "arith-direct-big": GpuProbe("arithmetic", 1024, ("arith-direct", "--canvas-length", "8"), 384_000, 0.065),
    "sort-direct-big": GpuProbe("sort_dedup", 512, ("sort-direct",), 96_000, 0.295),
}
CALIBRATION_STEPS = 20


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` with its output appended to `log`; seconds it took. A failure stops the benchmark."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.exit(f"gpu_tiny_tasks: `{' '.join(cmd[:5])} ...` failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def step_seconds(metrics: Path) -> float:
    """Median seconds a step in a run's metrics.jsonl, its first quarter left out (allocator and cache warm-up)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    if not seconds:
        sys.exit(f"gpu_tiny_tasks: no step times in {metrics}")
    return statistics.median(seconds[len(seconds) // 4:])


def train_cmd(recipe: tuple[str, ...], out: Path, args, batch: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "letterpress.cli", "train", "--recipe", *recipe, "--device", args.device,
            "--batch-size", str(batch), "--micro-batch-size", str(batch), "--log-every", "1", "--no-progress",
            "--no-plot", "--output", str(out), *extra]


def one_probe(probe: str, seconds: float, args, log: Path) -> dict:
    spec = PROBES[probe]
    family, batch = spec.family, 8 if args.tiny else spec.batch
    out = args.out / probe
    calibration = args.out / f"{probe}-calibration"
    for folder in (out, calibration):
        if folder.exists():
            sys.exit(f"gpu_tiny_tasks: {folder} exists; give another --out")
    run(train_cmd(spec.calibration, calibration, args, batch,
                     ["--steps", "100000", "--stop-after-steps", str(CALIBRATION_STEPS), "--eval-every", "0",
                      "--save-every", "0"]), log)
    per_step = step_seconds(calibration / "metrics.jsonl")
    steps = 4 if args.tiny else max(int(seconds / per_step), 100)
    warmup = max(min(100, steps // 10), 1)
    train_s = run(train_cmd((probe,), out, args, batch,
                            ["--steps", str(steps), "--warmup-steps", str(warmup), "--eval-every", "0",
                             "--save-every", str(max(steps // 4, 1))]), log)
    n = 4 if args.tiny else args.n
    scored = args.out / f"{probe}.json"
    run([sys.executable, "benchmarks/default_model.py", "--model", str(out / "model"), "--families", family,
         "--n", str(n), "--latency", "0", "--device", args.device, "--json", str(scored)], log)
    result = json.loads(scored.read_text())["families"][family]["train"]
    row = {"probe": probe, "family": family, "steps": steps, "batch": batch, "examples": steps * batch,
           "seconds_a_step": per_step, "train_s": train_s, "exact": result["exact"], "n": result["n"],
           "cpu_examples": spec.cpu_examples, "cpu_exact": spec.cpu_exact}
    if family == "arithmetic":
        table = args.out / f"{probe}-times-table.json"
        run([sys.executable, "benchmarks/times_table.py", "--model", str(out / "model"), "--device", args.device,
             "--json", str(table)], log)
        row["times_table"] = [w["exact"] for w in json.loads(table.read_text())["wordings"].values()]
    return row


def print_table(rows: list[dict], machine: str) -> None:
    print(f"machine: {machine}")
    print("| probe | steps x batch (examples) | s a step | held-out exact | CPU: examples, exact | times table |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        times = " / ".join(f"{x} of 88" for x in r.get("times_table", [])) or "-"
        print(f"| `{r['probe']}` | {r['steps']:,} x {r['batch']} ({r['examples']:,}) | {r['seconds_a_step']:.3f} | "
              f"**{r['exact']:.1%}** of {r['n']} | {r['cpu_examples']:,}, {r['cpu_exact']:.1%} | {times} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, of {', '.join(PROBES)}")
    p.add_argument("--minutes", type=float, default=4.0,
                   help="training steps' time of all the probes together (start-up and scoring add ~2 minutes a probe)")
    p.add_argument("--n", type=int, default=200, help="held-out prompts scored per probe")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the dry run: batch 8, 4 steps, 4 prompts scored")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-probes"))
    args = p.parse_args()
    probes = [x for x in args.probes.split(",") if x]
    unknown = [x for x in probes if x not in PROBES]
    if unknown or not probes:
        sys.exit(f"gpu_tiny_tasks: unknown probe {', '.join(unknown) or '(none)'}; choose from {', '.join(PROBES)}")
    if args.minutes <= 0 or args.n < 1:
        sys.exit("gpu_tiny_tasks: --minutes and --n must be positive")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_tiny_tasks: no CUDA device here (--device cpu --tiny is the dry run)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "8")
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine

    log = args.out / "log.txt"
    rows = []
    for probe in probes:
        rows.append(one_probe(probe, args.minutes * 60 / len(probes), args, log))
        print(f"{probe}: {rows[-1]['exact']:.1%} exact after {rows[-1]['examples']:,} examples", flush=True)
    report = {"machine": machine(), "rows": rows}
    (args.out / "gpu_tiny_tasks.json").write_text(json.dumps(report, indent=1))
    print_table(rows, report["machine"])


if __name__ == "__main__":
    main()
