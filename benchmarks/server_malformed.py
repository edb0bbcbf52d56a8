"""Malformed and hostile requests against `letterpress serve`: every answer must be a 4xx in OpenAI's error shape
(or a 2xx where the input is in fact valid), never a 5xx, and a good request must still work afterwards.

The inputs: each field of each endpoint's body set to values of the wrong type or out of range (`null`,
strings, numbers, 2**70, 1e999, lists, objects, booleans), text fields holding lone UTF-16 surrogates, JSON that
is not JSON (NaN, Infinity, trailing commas, invalid UTF-8, deep nesting, empty), unknown chat roles, bad
content parts, bad spans, oversize bodies (declared and chunked), and wrong methods. Prints the count of
inputs by status and every 5xx with its input.

    python benchmarks/server_malformed.py [--url http://127.0.0.1:8000] [-- server flags]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import httpx

from serve_load import machine, split_server_flags, start_server, stop_server  # noqa: E402

BASES = {
    "/v1/completions": {"prompt": "def f(x):", "max_tokens": 1, "max_denoising_steps": 1, "seed": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                             "max_denoising_steps": 1, "seed": 0},
    "/v1/edits": {"input": "x = 1\ny = 2\n", "spans": [[0, 1]], "max_denoising_steps": 1, "seed": 0},
}
FIELDS = {
    "/v1/completions": ["prompt", "max_tokens", "temperature", "n", "seed", "stop", "stream", "stream_options",
                        "suffix", "infill_strategy", "ignore_eos", "user", "model", "echo", "best_of", "logprobs",
                        "entropy_bound", "t_min", "t_max", "max_denoising_steps"],
    "/v1/chat/completions": ["messages", "max_tokens", "max_completion_tokens", "temperature", "n", "stop",
                             "stream", "tools", "tool_choice", "response_format", "logprobs", "top_p"],
    "/v1/edits": ["input", "spans", "instruction", "slack_tokens", "n", "temperature"],
}
# values as raw JSON text, so that the non-JSON literals can be sent too
VALUES = ["null", '"x"', "-1", "0", "1180591620717411303424", "1e999", "-1e999", "[]", "{}", "true", "[[]]",
          '["a", 1]', '{"a": 1}', "0.5", '"\\ud800"']
SURROGATE = '"a\\ud800b"'


def raw_body(base: dict, field: str, value: str) -> bytes:
    """`base` with `field` set to the raw JSON text `value`."""
    marker = "__VALUE__"
    text = json.dumps({**base, field: marker})
    return text.replace(json.dumps(marker), value).encode()


def inputs() -> list[tuple[str, str, bytes, dict]]:
    out = []
    json_headers = {"Content-Type": "application/json"}
    for path, base in BASES.items():
        for field in FIELDS[path]:
            for value in VALUES:
                out.append(("POST", path, raw_body(base, field, value), json_headers))
        for raw in [b"NaN", b"[1, 2]", b'{"a": Infinity}', b"{", b"", b"   ", b"\xff\xfe", b"[" * 50_000,
                    b'{"prompt": "x",}', json.dumps(base).encode()[:-1] + b", NaN}", b'"just a string"']:
            out.append(("POST", path, raw, json_headers))
        out.append(("POST", path, json.dumps(base).encode(), {"Content-Type": "text/plain"}))
        out.append(("GET", path, b"", {}))
        out.append(("PUT", path, b"{}", json_headers))
    chat = "/v1/chat/completions"
    for messages in [[{"role": "wizard", "content": "hi"}], [{"role": "user", "content": "__SURR__"}],
                     [{"role": "user", "content": [{"type": "text", "text": "__SURR__"}]}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     [{"role": "user", "content": [{"type": "audio"}]}], [{"role": "user", "content": [1]}],
                     [{"role": "user", "content": None}], [{"role": 5, "content": "hi"}], ["hi"], [[]],
                     [{"role": "system", "content": "only a system message"}],
                     [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]]:
        text = json.dumps({**BASES[chat], "messages": messages}).replace('"__SURR__"', SURROGATE)
        out.append(("POST", chat, text.encode(), json_headers))
    edits = "/v1/edits"
    for spans in [[[5, 2]], [[-1, 2]], [[0, 10**6]], [[0, 1], [0, 1]], [[0]], [[0, 1, 2]], [[0.5, 1]],
                  [[0, 1]] * 8000, [[i, i + 1] for i in range(0, 12, 2)], [["a", "b"]]]:
        out.append(("POST", edits, json.dumps({**BASES[edits], "spans": spans}).encode(), json_headers))
    comp = "/v1/completions"
    for body in [{"prompt": [10**9]}, {"prompt": [-1]}, {"prompt": [[]]}, {"prompt": [[1, 2], "x"]},
                 {"prompt": "x", "suffix": "y", "max_tokens": 10**6}, {"prompt": [1, 2], "suffix": "y"},
                 {"prompt": "x" * 500_000}, {"prompt": [7] * 300_000}, {"prompt": "x", "n": 10**6},
                 {"prompt": "x", "stop": ["\udc00"]}, {"prompt": "x", "stream_options": {"include_usage": True}}]:
        out.append(("POST", comp, json.dumps(body).encode(), json_headers))
    huge = json.dumps({"prompt": "x" * 3_000_000}).encode()
    out.append(("POST", comp, huge, json_headers))
    out.append(("POST", comp, iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]), json_headers))
    for method, path in [("HEAD", "/health"), ("HEAD", "/v1/models"), ("OPTIONS", "/v1/models"),
                         ("DELETE", "/v1/models"), ("GET", "/v1/models/%00"), ("GET", "/nothing")]:
        out.append((method, path, b"", {}))
    return out


def main() -> None:
    argv, server_flags = split_server_flags(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    args.concurrency, args.max_denoising_steps, args.extra = [8], None, server_flags
    proc, url = (None, args.url) if args.url else start_server(args)
    statuses: Counter[int] = Counter()
    server_errors, bad_shape, good_failures = [], [], 0
    cases = inputs()
    try:
        with httpx.Client(base_url=url, timeout=300) as http:
            for k, (method, path, body, headers) in enumerate(cases):
                r = http.request(method, path, content=body, headers=headers)
                statuses[r.status_code] += 1
                shown = (body if isinstance(body, bytes) else b"<chunked>")[:120]
                if r.status_code >= 500:
                    server_errors.append(f"{r.status_code} {method} {path} {shown!r}: {r.text[:200]}")
                elif r.status_code >= 400 and method != "HEAD":
                    error = r.json().get("error", {})
                    if set(error) != {"message", "type", "param", "code"}:
                        bad_shape.append(f"{r.status_code} {method} {path} {shown!r}: {r.text[:200]}")
                if k % 25 == 24 or k == len(cases) - 1:  # a good request still works
                    good = http.post("/v1/completions", json=BASES["/v1/completions"])
                    good_failures += good.status_code != 200
    finally:
        stop_server(proc)
    print(f"\nmachine: {machine()}; {len(cases)} inputs; server flags: {' '.join(server_flags) or '(defaults)'}")
    print("answers by status:", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print(f"5xx: {len(server_errors)}; 4xx not in OpenAI's error shape: {len(bad_shape)}; "
          f"good requests that failed in between: {good_failures}")
    for line in server_errors + bad_shape:
        print("  ", line)
    if server_errors or bad_shape or good_failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
