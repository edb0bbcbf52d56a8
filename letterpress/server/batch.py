"""`letterpress run-batch`: a file of OpenAI Batch API requests answered by the server's own routes, in-process.

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}` (the
format of OpenAI's Batch API and of `vllm run-batch`); each output line, in input order, is

    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": {...}},
     "error": null}

or, for a request the server refuses or fails, `response.body` null and `error` the server's error object
(`{"message", "type", "param", "code"}`: what the HTTP server would have answered, with its status code).

The requests go through the same ASGI app `letterpress serve` runs (`app.build_app`), called directly with no
socket: every check, default and response shape is the server's, and the engine batches the lines that are in
flight together (continuous batching), up to `max_inflight` requests at a time.

The envelope of every line (JSON, custom_id, method, url, body) is checked by `read_batch` before the model
loads, so a malformed file fails at once with its line number; a line whose *body* the server refuses gets its
error line and the others go on. This module imports neither torch nor fastapi.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import LetterpressError

# the server's POST routes a batch line may name (vLLM: chat and completions, plus its other endpoints)
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/edits")


@dataclass
class BatchLine:
    number: int  # 1-based line of the input file
    custom_id: str
    url: str
    body: dict


def read_batch(lines: Iterable[str]) -> Iterator[BatchLine]:
    """The requests of a batch file, blank lines skipped. Raises LetterpressError naming the line for one that is
    not a JSON object with a string `custom_id`, `method` POST, a `url` among BATCH_URLS and an object `body`,
    or whose custom_id an earlier line used (outputs are matched to inputs by it, as OpenAI requires)."""
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise LetterpressError(f"line {number}: not JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # Python's own limits: an integer of more than 4,300 digits
            raise LetterpressError(f"line {number}: not JSON this reader accepts ({str(e).split(';')[0]})") from None
        except RecursionError:
            raise LetterpressError(f"line {number}: nested too deeply to read") from None
        if not isinstance(line, dict):
            raise LetterpressError(f"line {number}: expected a JSON object with custom_id, method, url and body")
        custom_id, method, url, body = (line.get(k) for k in ("custom_id", "method", "url", "body"))
        if not isinstance(custom_id, str) or not custom_id:
            raise LetterpressError(f"line {number}: custom_id must be a non-empty string")
        if custom_id in seen:
            raise LetterpressError(f"line {number}: custom_id {custom_id!r} is used by an earlier line; each "
                                   "request needs its own (outputs are matched to inputs by it)")
        if method != "POST":
            raise LetterpressError(f"line {number}: method must be \"POST\", got {method!r}")
        if url not in BATCH_URLS:
            raise LetterpressError(f"line {number}: url must be one of {', '.join(BATCH_URLS)}, got {url!r}")
        if not isinstance(body, dict):
            raise LetterpressError(f"line {number}: body must be a JSON object (the request {url} takes)")
        unknown = sorted(set(line) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise LetterpressError(f"line {number}: unknown field(s) {', '.join(unknown)} (a line holds custom_id, "
                                   "method, url and body)")
        seen.add(custom_id)
        yield BatchLine(number, custom_id, url, body)


async def post(app, path: str, body: bytes) -> tuple[int, dict]:
    """POST `body` to the ASGI `app` at `path` with no socket: (status, the JSON response). The client never
    disconnects (the server's disconnect watch sees nothing)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("batch", 0), "server": ("batch", 0),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status, chunks = 500, []

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # no disconnect, ever (Starlette polls this with an immediate cancel)

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return status, {"error": {"message": f"the server answered {status} with a body that is not JSON",
                                  "type": "server_error", "param": None, "code": None}}


def output_line(line: BatchLine, status: int, response: dict) -> dict:
    """One line of the output file: the response body for a 200, else the server's error object."""
    ok = status == 200 and "error" not in response
    error = None if ok else response.get("error") or {"message": f"status {status}", "type": "server_error",
                                                      "param": None, "code": None}
    request_id = response.get("id") if ok else None
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": response if ok else None},
            "error": error}


async def answer(app, line: BatchLine) -> dict:
    if line.body.get("stream"):  # one JSON answer per line, as vLLM refuses it
        return output_line(line, 400, {"error": {
            "message": "stream: true cannot be used in a batch (each line gets one JSON response)",
            "type": "invalid_request_error", "param": "stream", "code": None}})
    status, response = await post(app, line.url, json.dumps(line.body).encode())
    return output_line(line, status, response)


async def run_batch(app, lines: Iterable[BatchLine], write: Callable[[dict], None], max_inflight: int,
                    done: Callable[[dict], None] = lambda out: None, max_ahead: int | None = None) -> None:
    """Answer every line through `app` (its lifespan runs around the batch: the engine thread starts and
    stops), at most `max_inflight` at a time, and `write` the outputs in input order as they become ready;
    `done` sees each output when it finishes (progress).

    A line starts only while fewer than `max_ahead` started lines (default 16 x max_inflight, vLLM's bound) are
    unwritten, so the answers held back behind one slow line stay bounded, however long the file. An error
    from `write` (a full disk, a closed pipe) or from reading `lines` stops the batch and is raised: the
    requests in flight are cancelled, and what was written stays written."""
    max_ahead = max_ahead or 16 * max_inflight
    slots = asyncio.Semaphore(max_inflight)  # requests in flight
    window = asyncio.Semaphore(max_ahead)  # lines started and not yet written
    order: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()  # started lines, in input order; None ends
    running: set[asyncio.Task] = set()

    async def one(line: BatchLine) -> dict:
        try:
            out = await answer(app, line)
        except Exception as e:  # the app answers its own errors; this is a bug, kept to its line
            out = output_line(line, 500, {"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                                    "type": "server_error", "param": None, "code": None}})
        finally:
            slots.release()
        done(out)
        return out

    async def start_all() -> None:
        try:
            for line in lines:
                await window.acquire()
                await slots.acquire()
                task = asyncio.create_task(one(line))
                running.add(task)
                task.add_done_callback(running.discard)
                order.put_nowait(task)
        finally:
            order.put_nowait(None)

    async with app.router.lifespan_context(app):
        starter = asyncio.create_task(start_all())
        try:
            while (task := await order.get()) is not None:
                write(await task)  # in input order: a slow line holds back the ones after it
                window.release()
            await starter  # raises what reading the lines raised
        finally:
            starter.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(starter, *running, return_exceptions=True)
