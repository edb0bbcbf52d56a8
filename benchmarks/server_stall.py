"""Does one large request stall the server? `/health` latency while a large request is being prepared.

For each scenario a probe thread sends `GET /health` back to back (each probe waits 10 ms after the last
answer) while one large request runs; we print the large request's status and time, and the probes' median
and worst latency. Scenarios (issue 12, item 2):

- chat-10MB: one chat message of 10 MiB of text (refused: 413 past --max-request-bytes; or, with a limit
  raised above it, 400 from the character bound on max_model_len before anything is tokenized)
- chat-max: the largest chat message that passes the character bound (rendered and tokenized, then 400)
- edits-N: `POST /v1/edits` with N one-character spans over 60,000 characters (400: the spans do not fit
  in one canvas; everything before that answer is span mapping)

With no --url it starts `letterpress serve` on a free loopback port (extra server flags after `--`).

    python benchmarks/server_stall.py [--scenarios chat-10MB edits-1000 edits-4000 edits-8000] [-- --max-request-bytes 20000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import httpx

from serve_load import machine, start_server  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex the jolly zebra ".split()


def text_of(chars: int) -> str:
    line = " ".join(WORDS) + "\n"
    return (line * (chars // len(line) + 1))[:chars]


def scenario_body(name: str, url: str) -> tuple[str, dict]:
    if name.startswith("chat-") and name.endswith("MB"):
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text_of(int(name[5:-2]) << 20)}]}
    if name == "chat-max":
        card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        chars = card.get("max_prompt_chars")
        if chars is None:
            raise SystemExit("chat-max needs a server that reports max_prompt_chars in /v1/models")
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text_of(chars - 200)}]}
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


def run(url: str, name: str) -> dict:
    path, body = scenario_body(name, url)
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(url, stop, latencies))
    with httpx.Client(base_url=url, timeout=600) as http:
        prober.start()
        time.sleep(0.2)  # a few probes before, so the probe connection is open
        before = len(latencies)
        start = time.monotonic()
        r = http.post(path, json=body)
        took = time.monotonic() - start
        stop.set()
        prober.join()  # the probe that was waiting during the request lands after it: count it
        during = latencies[before:] or latencies[-1:]
    message = r.json().get("error", {}).get("message", "") if r.headers.get("content-type", "").startswith(
        "application/json") else r.text
    return {"name": name, "status": r.status_code, "took": took, "probes": len(during),
            "p50": statistics.median(during), "max": max(during), "message": message[:100]}


def main() -> None:
    argv = sys.argv[1:]
    server_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start `letterpress serve`)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--scenarios", nargs="+", default=["chat-10MB", "edits-1000", "edits-4000", "edits-8000"])
    args = parser.parse_args(argv)
    args.concurrency, args.max_denoising_steps, args.extra = [8], None, server_flags
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        rows = [run(url, name) for name in args.scenarios]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"\nmachine: {machine()}; server flags: {' '.join(server_flags) or '(defaults)'}\n")
    print("| scenario | status | request time (s) | /health probes | p50 (ms) | max (ms) | answer |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['status']} | {r['took']:.2f} | {r['probes']} | {r['p50'] * 1000:.0f} | "
              f"{r['max'] * 1000:.0f} | {r['message']} |")


if __name__ == "__main__":
    main()
