"""`letterpress run-batch`: a JSONL file of OpenAI Batch API requests (vllm run-batch's format) answered by the
server's routes in-process; a real subprocess on the shipped tiny-tasks model, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from letterpress.embedded import ASSETS

TASKS = ASSETS / "tiny_tasks"
MARIA = "Convert to JSON: name=Maria, city=Lisbon, age=34"


def line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "letterpress.cli", "run-batch", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_a_batch_is_answered_line_by_line_in_input_order(tmp_path):
    """Each request gets the answer the server gives it (seeded: exact), in input order and under its
    custom_id; a request the server refuses gets its status and error object and harms none of the others."""
    requests = [
        line("maria", {"messages": [{"role": "user", "content": MARIA}], "seed": 0}),
        line("wrong-model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        line("date", {"messages": [{"role": "user", "content": "Write 2024-03-05 as DD/MM/YYYY"}], "temperature": 0}),
        line("stream", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        line("bad-max-tokens", {"prompt": "x", "max_tokens": 0}, url="/v1/completions"),
        line("plain", {"prompt": MARIA, "seed": 0}, url="/v1/completions"),
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(requests[:3]) + "\n\n" + "\n".join(requests[3:]) + "\n")  # a blank line is skipped
    run = run_batch("-i", str(src), "-o", str(out), "--model", str(TASKS), "--max-num-seqs", "2")
    assert run.returncode == 0, run.stderr
    assert "[3 answered, 3 failed" in run.stderr and "tokens/forward]" in run.stderr
    # stderr is a pipe here, not a terminal: progress comes as lines a log file can hold, not a bar
    assert "Running batch: 6/6 requests (100.0%)" in run.stderr and "\r" not in run.stderr
    outputs = [json.loads(text) for text in out.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == ["maria", "wrong-model", "date", "stream", "bad-max-tokens", "plain"]
    by_id = {o["custom_id"]: o for o in outputs}
    for name in ("maria", "date", "plain"):
        assert by_id[name]["response"]["status_code"] == 200 and by_id[name]["error"] is None
        assert by_id[name]["response"]["request_id"] == by_id[name]["response"]["body"]["id"]
    assert by_id["maria"]["response"]["body"]["choices"][0]["message"]["content"] == \
        '{"name": "Maria", "city": "Lisbon", "age": 34}'
    assert by_id["date"]["response"]["body"]["choices"][0]["message"]["content"] == "05/03/2024"
    assert by_id["plain"]["response"]["body"]["object"] == "text_completion"
    assert by_id["plain"]["response"]["body"]["usage"]["letterpress"]["canvases"] == 1
    for name, status, param in (("wrong-model", 404, "model"), ("stream", 400, "stream"),
                                ("bad-max-tokens", 400, "max_tokens")):
        assert by_id[name]["response"]["status_code"] == status and by_id[name]["response"]["body"] is None
        assert by_id[name]["error"]["param"] == param and by_id[name]["error"]["message"]
    assert len({o["id"] for o in outputs}) == len(outputs)


@pytest.mark.parametrize("input_file", ["-", "/dev/stdin"])
def test_a_pipe_is_read_once_as_utf8_and_answers_are_written_as_utf8(input_file):
    """A pipe (`-`, or a path such as /dev/stdin or a FIFO, which can be read only once) is read whole before
    loading and every line answered; bytes are UTF-8 whatever the locale's encoding, a byte-order mark
    (PowerShell's, Notepad's) is skipped, and a custom_id holding a lone surrogate is written escaped."""
    body = {"messages": [{"role": "user", "content": MARIA}], "seed": 0}
    text = "\ufeff" + line("日本", body) + "\r\n" + json.dumps({"custom_id": "x\ud800", "method": "POST",
                                                              "url": "/v1/chat/completions", "body": body}) + "\n"
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "run-batch", "-i", input_file, "-o", "-",
                          "--model", str(TASKS)], input=text.encode("utf-8"), capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert run.returncode == 0, run.stderr.decode()
    outputs = [json.loads(t) for t in run.stdout.decode("utf-8").splitlines()]
    assert [o["custom_id"] for o in outputs] == ["日本", "x\ud800"]
    assert all(o["response"]["status_code"] == 200 for o in outputs)


def test_a_batch_whose_output_cannot_be_written_stops_with_one_line():
    """A full disk (/dev/full) stops the batch at the first write: one line naming the output, exit 2, no
    traceback and no hang with requests still queued behind it."""
    body = {"messages": [{"role": "user", "content": MARIA}], "seed": 0}
    text = "".join(line(f"c{i}", body) + "\n" for i in range(40))
    run = run_batch("-i", "-", "-o", "/dev/full", "--model", str(TASKS), "--max-num-seqs", "1",
                    "--max-inflight", "2", stdin=text)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "error: cannot write --output-file /dev/full: No space left on device" in run.stderr


def test_a_batch_reads_standard_input_and_writes_standard_output():
    run = run_batch("-i", "-", "-o", "-", "--model", str(TASKS),
                    stdin=line("a", {"messages": [{"role": "user", "content": MARIA}], "seed": 0}) + "\n")
    assert run.returncode == 0, run.stderr
    (output,) = [json.loads(text) for text in run.stdout.splitlines()]
    assert output["custom_id"] == "a" and output["response"]["status_code"] == 200
    assert "-> standard output" in run.stderr


@pytest.mark.parametrize("text, message", [
    ("hello\n", "line 1: not JSON"),
    ("[1, 2]\n", "line 1: expected a JSON object"),
    ("\n" + json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}) + "\n", "line 2: custom_id must be"),
    (line("a", {}) + "\n" + line("a", {}) + "\n", "line 2: custom_id 'a' is used by an earlier line"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}) + "\n",
     'line 1: method must be "POST"'),
    (line("a", {}, url="/v1/embeddings") + "\n", "line 1: url must be one of /v1/chat/completions"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}) + "\n",
     "line 1: body must be a JSON object"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}) + "\n",
     "line 1: unknown field(s) extra"),
    ("\n\n", "holds no requests"),
    ('{"custom_id": "a", "body": {"seed": ' + "9" * 5000 + "}}\n", "line 1: not JSON this reader accepts"),
    ("[" * 100_000 + "\n", "line 1: nested too deeply to read"),
])
def test_a_malformed_batch_file_is_refused_before_torch_loads(tmp_path, text, message):
    """Every line's envelope is checked first: one line of error naming the line, exit 2, nothing loaded and
    no output file written."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(text)
    run = subprocess.run([sys.executable, "-c", "import sys\nfrom letterpress.cli import main\n"
                          "print(main(sys.argv[1:]), 'torch' in sys.modules)", "run-batch", "-i", str(src),
                          "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_the_output_may_not_replace_the_input(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(line("a", {}) + "\n")
    run = run_batch("-i", str(src), "-o", str(src))
    assert run.returncode == 2 and "are the same file" in run.stderr
    assert src.read_text() == line("a", {}) + "\n"


class SlowFirstApp:
    """An ASGI app that answers every request at once except the first, which takes 0.2 s: records how many
    requests had started by the time the first one answered."""

    def __init__(self):
        import contextlib

        self.started = 0
        self.started_while_held: int | None = None

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield

        self.router = type("Router", (), {"lifespan_context": staticmethod(lifespan)})()

    async def __call__(self, scope, receive, send):
        import asyncio

        body = json.loads((await receive())["body"])
        self.started += 1
        if body["n"] == 0:
            await asyncio.sleep(0.2)  # let the others run as far as the window allows
            self.started_while_held = self.started
        answer = json.dumps({"id": f"r{body['n']}"}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": answer})


def test_a_slow_line_holds_back_only_a_bounded_window_of_answers():
    """Answers behind a slow line wait in memory to keep the input order; the batch starts no line more than
    max_ahead past the first unwritten one, so that memory is bounded, and every line is still written in order."""
    import asyncio

    from letterpress.server.batch import BatchLine
    from letterpress.server.batch import run_batch as run_lines

    app, written = SlowFirstApp(), []
    lines = [BatchLine(n + 1, f"c{n}", "/v1/completions", {"n": n}) for n in range(100)]
    asyncio.run(run_lines(app, lines, written.append, max_inflight=2, max_ahead=10))
    assert app.started_while_held == 10  # the slow line and the 9 after it, no more
    assert [w["custom_id"] for w in written] == [f"c{n}" for n in range(100)]
    assert all(w["response"]["status_code"] == 200 for w in written)


class ObjectStore:
    """A loopback HTTP server standing in for a presigned object-store URL: GET serves `files`, PUT stores the
    body in `files` (what vllm run-batch's http(s) input and output talk to)."""

    def __init__(self, files: dict[str, bytes]):
        import http.server
        import threading

        store = self.files = files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = store.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def do_PUT(self):
                store[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_batch_reads_and_writes_http_urls(tmp_path):
    """-i URL is downloaded and -o URL is uploaded with PUT when the batch ends, as vllm run-batch does with
    presigned object-store URLs; the local copy in --output-tmp-dir is removed once uploaded."""
    body = {"messages": [{"role": "user", "content": MARIA}], "seed": 0}
    store = ObjectStore({"/in.jsonl": (line("a", body) + "\n" + line("b", body) + "\n").encode()})
    try:
        run = run_batch("-i", f"{store.url}/in.jsonl", "-o", f"{store.url}/out.jsonl", "--output-tmp-dir",
                        str(tmp_path), "--model", str(TASKS))
        assert run.returncode == 0, run.stderr
        outputs = [json.loads(t) for t in store.files["/out.jsonl"].decode().splitlines()]
        assert [o["custom_id"] for o in outputs] == ["a", "b"]
        assert outputs[0]["response"]["body"]["choices"][0]["message"]["content"] \
            == '{"name": "Maria", "city": "Lisbon", "age": 34}'
        assert list(tmp_path.iterdir()) == []
        missing = run_batch("-i", f"{store.url}/missing.jsonl", "-o", str(tmp_path / "out.jsonl"))
        assert missing.returncode == 2 and "Traceback" not in missing.stderr
        assert f"cannot read --input-file {store.url}/missing.jsonl: HTTP 404" in missing.stderr
    finally:
        store.close()


def test_progress_lines_report_at_most_every_interval_and_at_the_end():
    import io

    from letterpress.cli.printing import ProgressLines

    out = io.StringIO()
    clock = iter([1.0, 31.0, 40.0, 45.0, 70.0])  # four updates, then the close
    lines = ProgressLines(4, "Running batch", "requests", file=out, every=30)
    lines._clock = lambda: next(clock)
    lines.start = lines.last = 0.0
    with lines:
        for _ in range(4):
            lines.update()
    assert out.getvalue().splitlines() == ["Running batch: 2/4 requests (50.0%), 31.0 s",
                                           "Running batch: 4/4 requests (100.0%), 70.0 s"]
