"""Issue 12 against a real server on loopback: request size limits, strict JSON, lone surrogates, chat roles,
an event loop that keeps answering while large requests are prepared, 499 in /metrics, HEAD, and SIGTERM
(a real `letterpress serve` process)."""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from letterpress import LLM  # noqa: E402
from letterpress.errors import RequestError  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402

from .live_server import DEADLINE_S, KEY, MODEL, LiveServer, wait_healthy  # noqa: E402

LIMIT = 1_000_000  # --max-request-bytes of this module's server (the default is 2,000,000)
CHAT = [{"role": "user", "content": "Write a haiku about tests."}]
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server():
    llm = LLM(None, max_num_seqs=8, max_model_len=1024, prefill_chunk=64)
    llm.defaults.max_denoising_steps = 3  # fast requests by default; up to 48 when one asks (as test_server)
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY, max_denoising_steps=48,
                                        max_request_bytes=LIMIT))
    # As `letterpress serve` does once loaded: the heap so far (here: every test module's) stays out of full
    # garbage collections, which stop every thread of this process, the server's event loop included.
    gc.collect()
    gc.freeze()
    yield live
    gc.unfreeze()
    live.stop()


def assert_error(r, status: int, text: str | None = None, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if text is not None:
        assert text in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.2)


def still_serves(client) -> None:
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, seed=0).choices[0].finish_reason


# ------------------------------------------------------------------------------------------- sizes
def text_of(chars: int) -> str:
    line = "the quick brown fox jumps over the lazy dog "  # no escapes: one JSON byte per character
    return (line * (chars // len(line) + 1))[:chars]


def test_oversize_bodies_get_413(http, client):
    big = json.dumps({"messages": [{"role": "user", "content": text_of(LIMIT)}]}).encode()
    assert len(big) > LIMIT
    # Content-Length says so: refused before the body is read
    assert_error(http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}),
                 413, f"at most {LIMIT:,} bytes", code="request_too_large")

    # a chunked body (no Content-Length): refused once it has passed the limit
    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "more than", code="request_too_large")
    # the same request a byte under the limit is read (and refused for its length, 400, not 413)
    fits = json.dumps({"messages": [{"role": "user", "content": text_of(LIMIT - 100)}]}).encode()
    assert len(fits) <= LIMIT
    assert_error(http.post("/v1/chat/completions", content=fits, headers={"Content-Type": "application/json"}),
                 400, "max_model_len", code="context_length_exceeded")
    assert metric(http, 'letterpress_requests_total{status="413"}') >= 2
    still_serves(client)


@pytest.mark.parametrize("body", [
    {"prompt": PROMPT, "max_tokens": 4},
    {"prompt": [2, 100, 200] * 400},  # a token-id prompt past max_model_len: refused before any engine work
    {"prompt": text_of(100_000)},  # past the character bound: refused before tokenizing
])
def test_prompts_past_max_model_len_are_refused_before_tokenizing(http, server, body):
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    if body.get("max_tokens") == 4:
        assert r.status_code == 200
        return
    assert_error(r, 400, "max_model_len", param="prompt", code="context_length_exceeded")


# ------------------------------------------------------------------------------------------- strict JSON
@pytest.mark.parametrize("raw, text", [
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not JSON"),
    (b'{"prompt": "x", "temperature": Infinity}', "Infinity is not JSON"),
    (b'{"prompt": "x", "t_max": -Infinity}', "-Infinity is not JSON"),
    (b'{"prompt": "x\xff"}', "not valid UTF-8"),
    (b'{"prompt": "x",}', "malformed JSON"),
    (b"[" * 100_000, "malformed JSON"),
    (b"   ", "empty"),
])
def test_not_json_is_400(http, raw, text):
    r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, text)


LONE = "a\\ud800b"  # as it is written in JSON: a high surrogate with no low one after it


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "%s"}]}' % LONE, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}' % LONE,
     "messages"),
    ("/v1/completions", '{"prompt": "def f(", "suffix": "%s"}' % LONE, "suffix"),
    ("/v1/completions", '{"prompt": "%s"}' % LONE, "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\udc00"]}', "stop"),
    ("/v1/edits", '{"input": "%s", "spans": [[0, 1]]}' % LONE, "input"),
    ("/v1/edits", '{"input": "abc", "spans": [[0, 1]], "instruction": "%s"}' % LONE, "instruction"),
])
def test_lone_surrogates_are_400(http, client, path, body, param):
    r = http.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert_error(r, 400, "lone UTF-16 surrogate", param=param)
    still_serves(client)


def test_surrogate_pairs_are_text(client):
    # "\ud83d\ude00" is one character (an emoji) written as a pair: fine
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "smile \U0001F600"}],
                                           max_tokens=4, seed=0)
    assert reply.choices[0].finish_reason


# ------------------------------------------------------------------------------------------- chat roles
def test_unknown_chat_roles_are_400(http, server):
    for role in ("wizard", "model", "function", ""):
        r = http.post("/v1/chat/completions", json={"messages": [{"role": role, "content": "hi"}]})
        assert_error(r, 400, "system, developer, user, assistant, tool")
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "developer", "content": "Be terse."},
                                                             {"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    # LLM.chat validates the same way, before any generation
    with pytest.raises(RequestError, match="'wizard' is not a chat role"):
        server.server_state.llm.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(RequestError, match="lone UTF-16 surrogate"):
        server.server_state.llm.chat([{"role": "user", "content": "a\ud800b"}])
    with pytest.raises(RequestError, match="no conversations given"):
        server.server_state.llm.chat([])


# ------------------------------------------------------------------------------------------- the event loop
class HealthProbe:
    """GET /health back to back (10 ms apart) on its own connection, recording each latency."""

    def __init__(self, url: str):
        self.url, self.latencies, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                start = time.monotonic()
                assert http.get("/health").status_code == 200
                self.latencies.append(time.monotonic() - start)
                time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(DEADLINE_S)


def test_health_answers_while_the_largest_requests_are_prepared(server, http):
    """The largest bodies the server accepts (just under --max-request-bytes), sent together: a chat message
    (its template rendered, then refused by the character bound), an edit of a ~1 MB text (its window
    planned, the rest of it counted: tokenizing ~1 MB, then denoised), a token-id prompt (parsed, then
    refused) and an edit with 8,000 spans (refused). Before, all this ran on the event loop: /health waited
    for all of them (34 s for a 10 MB chat message, 16 s for 8,000 spans)."""
    text = text_of(LIMIT - 200)
    step = 60_000 // 8000
    bodies = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
        ("/v1/edits", {"input": text[:LIMIT - 300], "spans": [[10, 15]], "seed": 0}),
        ("/v1/completions", {"prompt": [7] * ((LIMIT - 100) // 3)}),
        ("/v1/edits#spans", {"input": text[:60_000], "spans": [[i * step, i * step + 1] for i in range(8000)]}),
    ]
    results = {}
    encoded = [(path, json.dumps(body).encode()) for path, body in bodies]  # before: this process is the server's
    assert all(len(data) <= LIMIT for _, data in encoded)

    def send(path, data):
        results[path] = http.post(path.split("#")[0], content=data, headers={"Content-Type": "application/json"})

    with HealthProbe(server.url) as probe:
        senders = [threading.Thread(target=send, args=item) for item in encoded]
        for t in senders:
            t.start()
        for t in senders:
            t.join(DEADLINE_S)
    assert_error(results["/v1/chat/completions"], 400, "max_model_len")
    assert results["/v1/edits"].status_code == 200, results["/v1/edits"].text
    assert results["/v1/edits"].json()["choices"][0]["text"].endswith(text[1000:LIMIT - 300])
    assert_error(results["/v1/completions"], 400, "max_model_len")
    assert_error(results["/v1/edits#spans"], 400, "one canvas")
    worst = max(probe.latencies)
    print(f"\n/health during the largest requests: {len(probe.latencies)} probes, worst {worst * 1000:.0f} ms")
    assert len(probe.latencies) >= 3
    assert worst < 0.5  # 100 ms is the goal (benchmarks/server_stall.py); this bound is only against flakiness


# ------------------------------------------------------------------------------------------- metrics, HEAD
def test_clients_that_left_count_as_499(http):
    reads = [0]  # every /metrics read is itself a 200, counted once its body has gone out

    def read(name):
        reads[0] += 1
        return metric(http, name)

    left = read('letterpress_requests_total{status="499"}')
    ok, reads[0] = read('letterpress_requests_total{status="200"}'), 1
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "seed": 8, "ignore_eos": True,
            "max_denoising_steps": 48}
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request whose client gives up
        http.post("/v1/completions", json=long, timeout=1.0)
    with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:  # a dropped stream
        assert r.status_code == 200
        next(r.iter_lines())
    eventually(lambda: read('letterpress_requests_total{status="499"}') >= left + 2, "two 499s")
    eventually(lambda: read("letterpress_running_rows") == 0, "rows freed")
    assert read('letterpress_requests_total{status="499"}') == left + 2
    before_last = reads[0]  # the reads since `ok`, the one for `ok` included, less the one below
    assert read('letterpress_requests_total{status="200"}') == ok + before_last  # no 200 for either request


def test_head_answers_like_get(http):
    for path in ("/health", "/v1/models", f"/v1/models/{MODEL}", "/metrics"):
        get, head = http.get(path), http.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert http.head("/v1/models/gpt-4").status_code == 404


# ------------------------------------------------------------------------------------------- SIGTERM
def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


LONG_STREAM = {"prompt": PROMPT, "max_tokens": 3900, "seed": 1, "ignore_eos": True, "stream": True}


@contextlib.contextmanager
def serving_a_long_stream(tmp_path, *flags: str) -> Iterator[tuple[subprocess.Popen, str, Iterator[str]]]:
    """A `letterpress serve` process with one long streaming completion open (its first chunk has arrived):
    yields (process, url, the stream's remaining lines); kills the server if it is still running after."""
    port = free_port()
    cmd = [sys.executable, "-m", "letterpress.cli", "serve", "--port", str(port), "--max-model-len", "4096",
           "--log-level", "warning", *flags]
    with open(tmp_path / f"serve-{port}.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc)
            with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                             json=LONG_STREAM) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # the stream is open
                yield proc, url, lines
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_drains_then_ends_open_streams_with_an_error_event(tmp_path):
    with serving_a_long_stream(tmp_path, "--shutdown-timeout", "2") as (proc, url, lines):
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the drain starts within a tick (0.1 s)
        # draining: new requests are refused, /health says so, the open stream goes on
        with httpx.Client(base_url=url, timeout=30) as other:
            assert_error(other.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}), 503,
                         "shutting down", code="shutting_down")
            assert other.get("/health").status_code == 503
        rest = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["error"]["code"] == "shutting_down", last
        proc.wait(DEADLINE_S)
        took = time.monotonic() - sent
    print(f"\nSIGTERM to exit with an open stream and --shutdown-timeout 2: {took:.2f} s")
    assert proc.returncode == 0
    assert took < 2 + 10  # the drain, then a step at most, uvicorn closing and the engine thread stopping


def test_a_second_signal_exits_at_once(tmp_path):
    with serving_a_long_stream(tmp_path, "--shutdown-timeout", "300") as (proc, url, lines):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining: 300 s allowed
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(DEADLINE_S)
        took = time.monotonic() - sent
    print(f"\nsecond signal to exit: {took:.2f} s")
    assert proc.returncode == 128 + signal.SIGINT
    assert took < 5
