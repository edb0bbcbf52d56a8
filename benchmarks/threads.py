"""Thread count of the CLI on a shared machine: wall time of `letterpress generate` (a fresh process, as a user
runs it: import, load, generate) with --threads 1, --threads <all cores> (torch's own default) and no flag (the
CLI's default: the cores the load average shows idle), interleaved round by round.

    python benchmarks/threads.py [--rounds 5] [--busy 2] [--max-new-tokens 64]

--busy K starts K spinning processes for the duration, to measure a machine busy with other work
reproducibly; the 1-minute load average at the start of each run is printed beside it (the default reads it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, machine


def spin() -> None:
    while True:
        pass


def run_generate(threads: int | None, max_new_tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default must not see it
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "letterpress.cli", "generate", "def fibonacci(n):", "--seed", "0",
           "--max-new-tokens", str(max_new_tokens), "-v"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    chosen = next((line.rsplit(": ", 1)[1] for line in out.stderr.splitlines() if "torch thread(s)" in line), "?")
    print(f"  threads={threads or 'default'} ({chosen}), load {os.getloadavg()[0]:.2f}: {seconds:.1f} s",
          flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="spinning processes to start beside the runs")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    candidates = {"--threads 1": 1, f"--threads {cores}": cores, "default": None}
    spinners = [mp.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        times: dict[str, list[float]] = {name: [] for name in candidates}
        names = list(candidates)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(run_generate(candidates[name], args.max_new_tokens))
    finally:
        for p in spinners:
            p.terminate()
    print(machine())
    print(f"{args.busy} spinning process(es) beside the runs; {args.rounds} rounds, median wall time per command:")
    for name, ts in times.items():
        print(f"  {name:12s} {statistics.median(ts):6.1f} s  (min {min(ts):.1f}, max {max(ts):.1f})")


if __name__ == "__main__":
    main()
