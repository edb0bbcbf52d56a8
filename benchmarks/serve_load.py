"""Load test for `letterpress serve`: N concurrent clients for a bounded time, at several concurrencies.

Each client sends /v1/completions requests back to back (distinct seeds, `ignore_eos` so every request asks
for the same work) until the time is up; requests already sent are awaited. Per concurrency it prints
requests/s, completion tokens/s, p50/p99 latency and lost requests (errors, non-200, wrong token counts),
which must be 0. With no --url it starts `letterpress serve` itself on a free loopback port.

    python benchmarks/serve_load.py [--url http://127.0.0.1:8000] [--concurrency 1 8 32] [--duration 40] \
        [--json serve.json] [--plot throughput.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/serve_load.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores"


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "letterpress.cli", "serve", *([args.model] if args.model else []), "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--max-model-len", "1024", "--log-level", "warning",
           *(["--max-denoising-steps", str(args.max_denoising_steps)] if args.max_denoising_steps else []),
           *getattr(args, "extra", [])]
    print("server:", " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become healthy")


def split_server_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[ours] -- [server flags]`: the benchmark's own arguments, and those after `--` for `letterpress serve`."""
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def stop_server(proc: subprocess.Popen | None) -> None:
    """Stop the server `start_server` started (None: the benchmark used a running one)."""
    if proc is not None:
        proc.terminate()
        proc.wait(30)


async def client(http: httpx.AsyncClient, worker: int, stop_at: float, args: argparse.Namespace,
                 latencies: list[float], tokens: list[int], lost: list[str]) -> None:
    i = 0
    while time.monotonic() < stop_at:
        body = {"prompt": f"def task_{worker}_{i}(x):", "max_tokens": args.max_tokens, "seed": worker * 100_000 + i,
                "ignore_eos": True}
        start = time.monotonic()
        try:
            r = await http.post("/v1/completions", json=body)
            n = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1
            if n != args.max_tokens:
                lost.append(f"{r.status_code}: {r.text[:200]}")
            else:
                latencies.append(time.monotonic() - start)
                tokens.append(n)
        except Exception as e:  # a lost request is a result, not a crash of the benchmark
            lost.append(repr(e))
        i += 1


async def level(url: str, concurrency: int, args: argparse.Namespace) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    lost: list[str] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as http:
        start = time.monotonic()
        stop_at = start + args.duration
        await asyncio.gather(*(client(http, w, stop_at, args, latencies, tokens, lost) for w in range(concurrency)))
        elapsed = time.monotonic() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "req_s": len(latencies) / elapsed, "tok_s": sum(tokens) / elapsed,
            "p50": statistics.median(latencies) if latencies else float("nan"), "p99": p99, "lost": lost}


def plot_throughput(rows: list[dict], out: str, max_tokens: int) -> Path:
    from letterpress.plots import line_chart

    return line_chart([r["concurrency"] for r in rows], {"tokens/s": [r["tok_s"] for r in rows]}, out,
                      title=f"letterpress serve: throughput ({max_tokens}-token requests)",
                      xlabel="concurrent clients", ylabel="completion tokens per second", log_x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start `letterpress serve`)")
    parser.add_argument("--model", default=None, help="MODEL for the server we start (default: embedded)")
    parser.add_argument("--api-key", default=os.environ.get("LETTERPRESS_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of new requests per concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-denoising-steps", type=int, default=None,
                        help="sampler cap for the server we start (default: the checkpoint's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--plot", default=None, help="also draw throughput against concurrency as a PNG here")
    args = parser.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        httpx.post(url + "/v1/completions", json={"prompt": "warm-up", "max_tokens": 1}, headers=headers, timeout=600)
        rows = [asyncio.run(level(url, c, args)) for c in args.concurrency]
    finally:
        stop_server(proc)
    print(f"\nmachine: {machine()}; {args.max_tokens} tokens per request, {args.duration:g}s per level\n")
    print("| concurrency | requests | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {len(r['lost'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "max_tokens": args.max_tokens,
                                               "duration": args.duration, "levels": rows}, indent=2) + "\n")
    if args.plot:
        print("chart:", plot_throughput(rows, args.plot, args.max_tokens))
    for r in rows:
        for reason in r["lost"][:3]:
            print(f"lost at concurrency {r['concurrency']}: {reason}", file=sys.stderr)
    if any(r["lost"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
