"""The engine loop: one background thread owns `llm.scheduler`; asyncio handlers talk to it through queues.

    handler (asyncio thread)                       engine thread
    ------------------------                       -------------
    engine.submit(stream, requests) --inbox-->     drain inbox: scheduler.add / scheduler.abort
    engine.abort(request_ids)       --inbox-->     scheduler.step(): one batched denoise for every row
                                    <--stream--    listener(CanvasEvent) and finished RequestOutputs,
                                                   via loop.call_soon_threadsafe(stream.queue.put_nowait)

Only the engine thread touches the scheduler, the runner and the model, so none of them needs a lock. Work
that is not a scheduler row (the Sudoku rule search, server/sudoku.py) comes as an `EngineTask`: the thread
advances each task by one model pass per turn of its loop, between the scheduler's steps, so a long search
neither blocks the other requests nor runs the model at the same time as they do. The
inbox is a thread-safe FIFO, so an abort is always processed after the add it refers to; `wake` lets the
thread sleep while there is no work. Requests are admitted between steps (the scheduler does this in
`step()`), and a prompt is encoded `prefill_chunk` tokens per step, so a long prompt does not stall the
rows that are denoising.

Faults: the runner keeps a failure in its row (engine/runner.py), so a row that fails reaches its stream
as an exception (a 500, or a 400 for a RequestError) and its batch-mates go on. A row whose deadline
(`--request-timeout`, set at submission) passes is stopped by the scheduler and its stream gets a
`RequestTimeout` (a 504). Only an exception outside the rows' steps (a bug in the scheduler itself) still
fails every request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol

from ..engine.llm import LLM
from ..engine.request import CanvasEvent, Request, RequestOutput, SamplingParams
from ..errors import RequestError
from .metrics import Metrics
from .schemas import ApiError

log = logging.getLogger("letterpress.server")


class EngineError(Exception):
    """An engine step failed for a request's row (or, for a bug outside the rows, for every row): a 500."""


class RequestTimeout(ApiError):
    """The request's deadline (--request-timeout) passed before its rows finished; they were stopped."""

    def __init__(self, seconds: float):
        super().__init__(504, f"the request did not finish within the server's --request-timeout of {seconds:g} s; "
                              "its rows were stopped (ask for fewer tokens or denoising steps)",
                         type_="server_error", code="request_timeout")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at --max-queue: the handler answers 429."""


class EngineTask(Protocol):
    """A row that the engine thread runs itself instead of the scheduler (it counts against the same capacity,
    deadline and aborts). `advance` does one model pass, sends its CanvasEvents through `request.listener`,
    and returns the row's RequestOutput once it is finished (None before). An exception fails this row only.
    `decoder_passes` counts the task's decoder passes so far: /metrics adds them to the scheduler's."""

    decoder_passes: int

    def advance(self, request: Request) -> RequestOutput | None: ...


def stopped_output(request: Request, reason: str, error: Exception | None = None) -> RequestOutput:
    """The output of a task row that ended without an answer ("abort", "timeout", "error")."""
    return RequestOutput(request.request_id, request.prompt_token_ids, [], reason, 0, [], 0, 0.0,
                         time.perf_counter() - request.arrival, error=error)


class RequestStream:
    """The asyncio side of one HTTP request: its n rows push (row index, item) pairs into one queue.

    An item is a CanvasEvent (from the row's listener), the row's RequestOutput (it finished or was
    aborted), or an exception (the engine failed). `push` is the only method the engine thread calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    def push(self, index: int, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass

    def listener(self, index: int) -> Callable[[CanvasEvent], None]:
        return lambda event: self.push(index, event)

    async def get(self) -> tuple[int, Any]:
        return await self.queue.get()


class EngineLoop:
    def __init__(self, llm: LLM, max_queue: int, metrics: Metrics, request_timeout: float | None = None):
        self.llm = llm
        self.request_timeout = request_timeout  # seconds from submission; None: no deadline
        self.scheduler = llm.scheduler
        self.metrics = metrics
        self.capacity = self.scheduler.max_num_seqs + max_queue  # rows running + rows waiting
        self.ready = threading.Event()  # set once the warm-up step ran
        self.failed: BaseException | None = None
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _rows_in_flight, which handlers read and the engine updates
        self._rows_in_flight = 0
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # request_id -> (stream, row index); engine thread
        self._tasks: dict[str, tuple[Request, EngineTask]] = {}  # request_id -> task rows; engine thread
        self._stopping = False
        self._passes_at_start = 0
        self._task_passes = 0  # decoder passes the tasks ran (the runner counts the scheduler's)
        self._prefix_at_start = (0, 0)  # prefix-cache (queries, hits) before serving
        self._thread = threading.Thread(target=self._main, name="letterpress-engine", daemon=True)

    # ------------------------------------------------------------------------------ called from asyncio
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and self.failed is None and self._thread.is_alive()

    def submit(self, stream: RequestStream, requests: list[Request], tasks: list[EngineTask] | None = None) -> None:
        """Queue rows for the engine (all or none); raises QueueFull when they do not fit. With `tasks` (one per
        row) the engine thread runs each row as that task instead of handing it to the scheduler."""
        if self.failed is not None:
            raise EngineError(f"the engine loop died: {self.failed!r}; restart the server")
        with self._lock:
            if self._rows_in_flight + len(requests) > self.capacity:
                raise QueueFull
            self._rows_in_flight += len(requests)
        if self.request_timeout is not None:
            deadline = time.perf_counter() + self.request_timeout
            for request in requests:
                request.deadline = deadline if request.deadline is None else min(request.deadline, deadline)
        for index, request in enumerate(requests):
            self._inbox.put(("add", request, stream, index, None if tasks is None else tasks[index]))
        self._wake.set()

    def abort(self, request_ids: list[str]) -> None:
        """Free these rows at the next step (a client went away, or a stop string ended the choice)."""
        self._inbox.put(("abort", request_ids))
        self._wake.set()

    # ------------------------------------------------------------------------------ the engine thread
    def _main(self) -> None:
        try:
            self._warm_up()
            self.ready.set()
            while not self._stopping:
                self._drain_inbox()
                if self.scheduler.has_work() or self._tasks:
                    self._step()
                else:
                    self._wake.wait()
                    self._wake.clear()  # cleared before the next drain, so no submission is missed
        except BaseException as e:  # a bug in this loop: /health turns 503 and every open request gets a 500
            log.exception("the engine loop died")
            self.failed = e
            error = EngineError(f"the engine loop died: {type(e).__name__}: {e}")
            for stream, index in self._streams.values():
                stream.push(index, error)
            self._fail_inbox(error)

    def _fail_inbox(self, error: EngineError) -> None:
        """Answer the rows that were submitted but never reached the scheduler (the loop is gone)."""
        for message in self._take_inbox():
            if message[0] == "add":
                message[2].push(message[3], error)

    def _take_inbox(self):
        """Every message waiting in the inbox, without blocking."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _warm_up(self) -> None:
        """One tiny generation, so that torch's one-off start-up cost is not paid by the first request."""
        tokenizer = self.llm.tokenizer
        token = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else 0
        self.llm.generate([token], SamplingParams(max_new_tokens=1, max_denoising_steps=1, seed=0))
        self._passes_at_start = self.llm.runner.decoder_passes
        self._prefix_at_start = (self.scheduler.prefix_cache_queries, self.scheduler.prefix_cache_hits)

    def _drain_inbox(self) -> None:
        for message in self._take_inbox():
            if message[0] == "add":
                self._add(*message[1:])
            else:
                for request_id in message[1]:
                    if request_id in self._tasks:  # gone at once (a scheduler row leaves at its next step)
                        request, _ = self._tasks.pop(request_id)
                        self._update_metrics()  # no step may follow to update the running rows
                        self._deliver(stopped_output(request, "abort"))
                    else:
                        self.scheduler.abort(request_id)

    def _add(self, request: Request, stream: RequestStream, index: int, task: EngineTask | None = None) -> None:
        request.listener = self._counting(request.listener)
        self._streams[request.request_id] = (stream, index)
        if task is not None:
            self._tasks[request.request_id] = (request, task)
            return
        try:
            self.scheduler.add(request)
        except Exception as e:  # the handler already ran scheduler.check, so this is unexpected
            self._streams.pop(request.request_id)
            self._release_rows(1)
            stream.push(index, e)

    def _counting(self, listener: Callable[[CanvasEvent], None] | None) -> Callable[[CanvasEvent], None]:
        def counted(event: CanvasEvent) -> None:
            if event.final:
                self.metrics.count_canvas(len(event.token_ids), event.step)
            if listener is not None:
                listener(event)

        return counted

    def _step(self) -> None:
        """One scheduler step and one pass of every task row; then the metrics, once, and the finished rows'
        answers: a client that reads /metrics after its answer sees the passes that made it."""
        outputs = self._scheduler_step() if self.scheduler.has_work() else []
        if self._tasks:
            outputs += self._advance_tasks()
        self._update_metrics()
        for output in outputs:
            self._deliver(output)

    def _advance_tasks(self) -> list[RequestOutput]:
        """One pass of every task row; a task that fails or passes its deadline ends alone. Returns the
        outputs of the task rows that finished."""
        finished = []
        for request_id, (request, task) in list(self._tasks.items()):
            if request.deadline is not None and time.perf_counter() > request.deadline:
                output = stopped_output(request, "timeout")
            else:
                passes = task.decoder_passes
                try:
                    output = task.advance(request)
                except Exception as e:  # this row's fault or bug: its own 400 / 500, the others go on
                    if not isinstance(e, RequestError):
                        log.exception("engine task %s failed", request_id)
                    output = stopped_output(request, "error", e)
                self._task_passes += task.decoder_passes - passes
            if output is not None:
                del self._tasks[request_id]
                finished.append(output)
        return finished

    def _scheduler_step(self) -> list[RequestOutput]:
        try:
            return self.scheduler.step()
        except Exception as e:  # not a row's fault (the runner isolates those): a bug; fail all, keep serving
            log.exception("an engine step failed; failing the %d row(s) in flight", len(self._streams))
            return self._fail_everything(EngineError(f"the engine step failed: {type(e).__name__}: {e}"))

    def _update_metrics(self) -> None:
        """Decoder passes since start-up: the scheduler's batched passes and the tasks' own, one each. The task
        rows run at once (they never wait for a slot), so they count as running."""
        self.metrics.after_step(self.llm.runner.decoder_passes - self._passes_at_start + self._task_passes,
                                self.scheduler.num_waiting, self.scheduler.num_running + len(self._tasks),
                                self.llm.runner.cache.usage(),
                                self.scheduler.prefix_cache_queries - self._prefix_at_start[0],
                                self.scheduler.prefix_cache_hits - self._prefix_at_start[1])

    def _fail_everything(self, error: EngineError) -> list[RequestOutput]:
        for request_id, (stream, index) in self._streams.items():
            if request_id in self._tasks:
                continue  # not the scheduler's: the tasks go on
            stream.push(index, error)
            self.scheduler.abort(request_id)
        return self.scheduler.step()  # drops every row; with nothing running it calls no model code

    def _deliver(self, output: RequestOutput) -> None:
        stream, index = self._streams.pop(output.request_id, (None, 0))
        self._release_rows(1)
        self.metrics.count_row(output.finish_reason, output.tokens_per_forward)
        if stream is not None:
            stream.push(index, self._answer(output))

    def _answer(self, output: RequestOutput) -> Any:
        """What a row's stream gets: its output, or the exception its handler raises."""
        if output.finish_reason == "timeout":
            return RequestTimeout(self.request_timeout or 0)
        if output.finish_reason == "error":
            e = output.error
            if isinstance(e, RequestError):
                return e  # the request's own fault: a 400
            return EngineError(f"the engine failed on this request (others were not affected): {type(e).__name__}: {e}")
        return output

    def _release_rows(self, n: int) -> None:
        with self._lock:
            self._rows_in_flight -= n
