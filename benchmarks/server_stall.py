"""Does one large request stall the server? `/health` latency while a large request is being prepared.

For each scenario a probe thread sends `GET /health` back to back (each probe waits 10 ms after the last
answer) while one large request runs; we print the large request's status and time, and the probes' median
and worst latency. Scenarios (issue 12, item 2):

- chat-NMB: one chat message of N MiB of text (past --max-request-bytes: 413; under it, 400 from the
  character bound on max_model_len, checked on the rendered template before anything is tokenized)
- chat-max: a chat message that fills the body limit (--max-request-bytes, default 2,000,000)
- ids-max: a token-id prompt that fills the body limit (the parse itself is the work; then 400)
- edit-max: an edit of a text that fills the body limit, one span near the top (200: planned on a window,
  the rest counted)
- edits-N: `POST /v1/edits` with N one-character spans over 60,000 characters (400: they do not fit in one
  canvas)
- spans-N (no server): the span-to-token mapping alone for N spans over 60,000 characters, the old per-span
  scan against the sweep, in this process

With no --url it starts `letterpress serve` on a free loopback port (extra server flags after `--`).

    python benchmarks/server_stall.py [--scenarios chat-10MB chat-max ids-max edit-max edits-8000 spans-8000] \
        [-- --max-request-bytes 20000000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import httpx

# benchmarks/ is on sys.path when run as a script
from serve_load import machine, split_server_flags, start_server, stop_server  # noqa: E402


def text_of(chars: int) -> str:
    line = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex the jolly zebra "
    return (line * (chars // len(line) + 1))[:chars]  # no JSON escapes: one byte per character


def scenario_body(name: str, limit: int) -> tuple[str, dict]:
    if name.startswith("chat-") and name.endswith("MB"):
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text_of(int(name[5:-2]) << 20)}]}
    if name == "chat-max":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text_of(limit - 200)}]}
    if name == "ids-max":
        return "/v1/completions", {"prompt": [7] * ((limit - 100) // 3)}
    if name == "edit-max":
        return "/v1/edits", {"input": text_of(limit - 300), "spans": [[10, 15]], "seed": 0}
    if name.startswith("edits-"):
        n = int(name[6:])
        text = text_of(60_000)
        step = len(text) // n
        return "/v1/edits", {"input": text, "spans": [[i * step, i * step + 1] for i in range(n)]}
    raise SystemExit(f"unknown scenario {name}")


def probe(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            start = time.monotonic()
            http.get("/health")
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)


def spans_scenario(name: str) -> dict:
    """The span mapping alone, old scan against the sweep (same runs), for N spans over 60,000 characters."""
    from common import ROOT  # noqa: F401  (puts the checkout on sys.path)

    from letterpress.embedded import default_model_dir
    from letterpress.infill import _span_tokens_scan, span_tokens
    from letterpress.tokenizer import Tokenizer

    n = int(name[6:])
    text = text_of(60_000)
    _, offsets = Tokenizer.from_dir(default_model_dir()).encode_with_offsets(text)
    step = len(text) // n
    spans = [(i * step, i * step + 1) for i in range(n)]
    start = time.monotonic()
    old = _span_tokens_scan(offsets, spans)
    scan = time.monotonic() - start
    start = time.monotonic()
    new = span_tokens(offsets, spans)
    sweep = time.monotonic() - start
    assert old == new
    return {"name": name, "status": "-", "took": sweep, "probes": 0, "p50": 0.0, "max": 0.0,
            "message": f"{len(offsets):,} tokens: per-span scan {scan:.2f} s, sweep {sweep * 1000:.1f} ms"}


def run(url: str, name: str, limit: int) -> dict:
    if name.startswith("spans-"):
        return spans_scenario(name)
    path, body = scenario_body(name, limit) if name != "idle" else (None, None)
    data = None if body is None else json.dumps(body).encode()  # encoded before the probes start
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(url, stop, latencies))
    with httpx.Client(base_url=url, timeout=600) as http:
        prober.start()
        while len(latencies) < 3:  # a few probes before, so the probe connection is open
            time.sleep(0.05)
        before = len(latencies)
        start = time.monotonic()
        if data is None:  # the machine's own noise: probes alone for 3 s
            time.sleep(3.0)
            r = httpx.Response(200, text="")
        else:
            r = http.post(path, content=data, headers={"Content-Type": "application/json"})
        took = time.monotonic() - start
        stop.set()
        prober.join()  # the probe that was waiting during the request lands after it: count it
        during = latencies[before:] or latencies[-1:]
    message = r.json().get("error", {}).get("message", "") if r.headers.get("content-type", "").startswith(
        "application/json") and r.status_code != 200 else ""
    return {"name": name, "status": r.status_code, "took": took, "probes": len(during),
            "p50": statistics.median(during), "max": max(during), "message": message[:100]}


def main() -> None:
    argv, server_flags = split_server_flags(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start `letterpress serve`)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--scenarios", nargs="+",
                        default=["idle", "chat-10MB", "chat-max", "ids-max", "edit-max", "edits-8000"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (worst probe: median and max)")
    args = parser.parse_args(argv)
    args.concurrency, args.max_denoising_steps, args.extra = [8], None, server_flags
    limit = 2_000_000
    if "--max-request-bytes" in server_flags:
        limit = int(server_flags[server_flags.index("--max-request-bytes") + 1])
    in_process = all(name.startswith("spans-") for name in args.scenarios)
    proc, url = (None, args.url) if args.url or in_process else start_server(args)
    try:
        rows = []
        for name in args.scenarios:
            runs = [run(url, name, limit) for _ in range(1 if name.startswith("spans-") else args.repeat)]
            row = dict(runs[-1], took=statistics.median(r["took"] for r in runs),
                       p50=statistics.median(r["p50"] for r in runs), max=max(r["max"] for r in runs),
                       max_median=statistics.median(r["max"] for r in runs), probes=sum(r["probes"] for r in runs))
            rows.append(row)
    finally:
        stop_server(proc)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {machine()}, load average {load:.1f}; server flags: {' '.join(server_flags) or '(defaults)'}; "
          f"{args.repeat} run(s) per scenario\n")
    print("| scenario | status | request time (s, median) | /health probes | p50 (ms) | worst, median of runs (ms) "
          "| worst of all (ms) | answer |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['status']} | {r['took']:.2f} | {r['probes']} | {r['p50'] * 1000:.0f} | "
              f"{r.get('max_median', r['max']) * 1000:.0f} | {r['max'] * 1000:.0f} | {r['message'][:90]} |")


if __name__ == "__main__":
    main()
