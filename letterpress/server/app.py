"""Routes, streaming, errors, auth and metrics of the OpenAI-compatible server.

One HTTP request becomes a `Job` (server/core.py): n engine rows (one per choice; several prompts on
/v1/completions give n rows each) that share one `RequestStream`. `Job.events()` turns the rows' canvases into text deltas and
finish reasons; the non-streaming path collects them, the streaming path sends each as an SSE chunk.
Infilling (`suffix`) may give a choice several competing rows (`Job.groups`); edits (`/v1/edits`) are rows
too. Both are planned in `server/infill.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..apps.sudoku import trained_givens
from ..engine.llm import LLM
from ..engine.limits import MIN_TEMPERATURE
from ..engine.request import CanvasEvent, SamplingParams
from ..errors import CheckpointError, LetterpressError, NotSupportedError, RequestError
from ..engine.llm import soft_tokens_of
from ..media.messages import has_media
from ..media.prompt import MediaRun
from ..structured import SchemaError, StructuredOutputsParams
from .chat import ChatChoice, ChatOptions, render_chat
from .structured import from_body as structured_from_body, param_of as structured_param
from .body import default_max_request_bytes, parse_body, read_body
from .engine_loop import EngineError, EngineLoop, QueueFull, RequestStream
from .core import DEFAULT_STEP_CEILING, DISCONNECTED, Job, ServerConfig
from .infill import edit_job, edit_response, infill_job
from .metrics import Metrics
from .page import install_playground
from .sudoku import harder_puzzle_note, sudoku_job
from .schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EditRequest,
    _Common,
    _Sampler,
    error_body,
    model_card,
    refuse_unsupported,
)
from . import vllm_compat
from .text import ChoiceText

log = logging.getLogger("letterpress.server")

T = TypeVar("T")


class ShuttingDown(Exception):
    """The server is shutting down and its drain time is up: what is still open ends with this error."""


MEDIA_WORKERS = 4  # threads that prepare requests with images or video (fetch, decode)
GREEDY_BELOW = 1e-5  # a temperature below this is greedy, as in vLLM (its _SAMPLING_EPS)


# ------------------------------------------------------------------------------------------ the server
class OpenAIServer:
    def __init__(self, llm: LLM, config: ServerConfig):
        if llm.tokenizer is None:
            raise CheckpointError("letterpress serve needs a checkpoint with a tokenizer.json")
        self.llm = llm
        if config.max_request_bytes is None:
            images = config.media_limits.max_image_bytes if llm.vision is not None else None
            config = dataclasses.replace(config, max_request_bytes=default_max_request_bytes(images))
        self.config = config
        self.metrics = Metrics()
        self.engine = EngineLoop(llm, config.max_queue, self.metrics, config.request_timeout)
        self.created = int(time.time())
        self.t_min = config.t_min if config.t_min is not None else llm.defaults.t_min
        self.t_max = config.t_max if config.t_max is not None else llm.defaults.t_max
        checkpoint_steps = llm.defaults.max_denoising_steps
        self.step_ceiling = config.max_denoising_steps or max(DEFAULT_STEP_CEILING, checkpoint_steps)
        self.default_steps = min(checkpoint_steps, self.step_ceiling)
        self.sudoku_trained_givens = trained_givens(llm.folder)  # None but for a Sudoku model
        # Parsing, chat templates, tokenizing and planning run here, never on the event loop; two workers keep
        # many large requests from crowding out the loop (and the engine thread) for the GIL.
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="letterpress-prep")
        # Requests with media parts are prepared on their own threads: a fetch may wait up to its deadline
        # (5 s for an image, 30 s for a video) and decoding takes a while, and text requests must not queue
        # behind them. Four such requests at once make the next one with media wait.
        self.media_prep = ThreadPoolExecutor(max_workers=MEDIA_WORKERS, thread_name_prefix="letterpress-media")
        # A text longer than this many characters cannot fit in max_model_len tokens (None: no such bound)
        per_token = llm.tokenizer.max_chars_per_token()
        self.max_prompt_chars = None if per_token is None else llm.max_model_len * per_token
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts
        self.draining = False  # after SIGTERM: refuse new requests, let open ones finish
        self.open_jobs: set[Job] = set()  # submitted and not yet answered in full

    # ------------------------------------------------------------------------------------------ requests
    async def read(self, raw: HttpRequest, model: type[T]) -> T:
        """The request body as `model`: 413 past --max-request-bytes, 400 for anything that is not JSON."""
        data = await read_body(raw, self.config.max_request_bytes, self.llm.vision is not None)
        return await self.off_loop(parse_body, data, model)

    async def off_loop(self, fn: Callable[..., T], *args, media: bool = False) -> T:
        """Run `fn(*args)` on a preparation thread, so that the event loop keeps answering meanwhile; `media`:
        on a media thread (the request fetches or decodes images or video)."""
        pool = self.media_prep if media else self.prep
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def check_chars(self, text: str, what: str, param: str | None = None) -> None:
        """Refuse, before tokenizing, a text that cannot fit in max_model_len tokens whatever its tokens."""
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise ApiError(400, f"{what} is {len(text):,} characters: more than max_model_len "
                                f"{self.llm.max_model_len} tokens can hold ({self.max_prompt_chars:,} characters "
                                "at most); shorten it", param=param, code="context_length_exceeded")

    def completion_job(self, body: CompletionRequest) -> Job:
        job = self.make_job("completion", body, self.completion_prompts(body.prompt), body.max_tokens,
                            structured=structured_from_body(body))
        # a Sudoku model says when the puzzle is harder than what it learned (as `letterpress sudoku` does)
        job.usage_notes.update(harder_puzzle_note(self.sudoku_trained_givens, body.prompt))
        return job

    def chat_job(self, body: ChatCompletionRequest) -> Job:
        """Render, fetch and decode the media parts, tokenize: all on a preparation thread."""
        def render(messages: list[Any]) -> tuple[str, ChatOptions]:
            text, chat = render_chat(self.llm.tokenizer, body.model_copy(update={"messages": messages}))
            self.check_chars(text, "the conversation (rendered by the chat template)", "messages")
            return text, chat

        tier = soft_tokens_of(body.mm_processor_kwargs)
        ids, media, chat = self.llm.chat_prompt(body.messages, render, self.config.media_limits, tier)
        return self.make_job("chat", body, [ids], body.max_completion_tokens or body.max_tokens, chat, [media],
                             structured=chat.structured)

    def check_model(self, model: str | None) -> str:
        names = self.config.served_model_names
        if model is not None and model not in names:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves {names[0]!r}",
                           param="model", code="model_not_found")
        return model or names[0]

    def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """A string, a list of token ids, or a list of either (a batch: each gets n choices). A string is
        tokenized with the checkpoint's BOS; token ids are used as given."""
        if prompt == []:
            raise ApiError(400, "the prompt is empty", param="prompt")
        single = isinstance(prompt, str) or isinstance(prompt[0], int)
        prompts = [prompt] if single else prompt
        if any(p == [] for p in prompts):
            raise ApiError(400, "a token-id prompt is empty", param="prompt")
        for p in prompts:
            if isinstance(p, str):
                self.check_chars(p, "the prompt", "prompt")
            elif len(p) > self.llm.max_model_len:
                raise ApiError(400, f"the prompt is {len(p):,} tokens: more than max_model_len "
                                    f"{self.llm.max_model_len}", param="prompt", code="context_length_exceeded")
        ids = [self.llm.tokenize(p) for p in prompts]
        for prompt_ids in ids:  # media go through chat messages; a bare placeholder would have nothing to fill it
            self.llm.check_placeholders(prompt_ids)
        return ids

    def sampling_params(self, body: _Sampler, max_tokens: int | None, index: int) -> SamplingParams:
        """temperature T scales the checkpoint's t_min/t_max schedule (T=1: unchanged); T=0 (below 1e-5, as
        in vLLM) is greedy (argmax proposals, unscaled schedule) with seed 0 unless one is given, so it is
        deterministic. An explicit t_min / t_max wins over the scaling. Row `index` of a request with a seed
        uses seed + index. max_denoising_steps may not exceed the server's ceiling."""
        temperature = 1.0 if body.temperature is None else body.temperature
        greedy = temperature < GREEDY_BELOW or self.t_max * temperature < MIN_TEMPERATURE
        scale = 1.0 if greedy else temperature
        seed = body.seed if body.seed is not None else (0 if greedy else None)
        cfg = self.config
        steps = body.max_denoising_steps
        if steps is not None and steps > self.step_ceiling:
            raise ApiError(400, f"max_denoising_steps {steps} exceeds this server's limit of {self.step_ceiling} "
                                "(--max-denoising-steps)", param="max_denoising_steps")
        vllm_steps = vllm_compat.diffusion_xargs(body.vllm_xargs)  # vLLM's name; capped at the ceiling, as vLLM caps
        if vllm_steps is not None:
            if steps is not None and steps != vllm_steps:
                raise ApiError(400, "max_denoising_steps and vllm_xargs.diffusion_max_steps disagree; give one",
                               param="vllm_xargs")
            steps = min(vllm_steps, self.step_ceiling)
        ignore_eos = getattr(body, "ignore_eos", False)
        eos = vllm_compat.stop_token_ids(getattr(body, "stop_token_ids", None), self.llm.defaults.eos_token_ids,
                                         self.llm.runner.vocab_size, ignore_eos)
        return SamplingParams(
            max_new_tokens=max_tokens,
            max_denoising_steps=steps or self.default_steps,
            entropy_bound=body.entropy_bound or cfg.entropy_bound,
            t_min=body.t_min if body.t_min is not None else self.t_min * scale,
            t_max=body.t_max if body.t_max is not None else self.t_max * scale,
            seed=None if seed is None else seed + index,
            greedy=greedy,
            ignore_eos=ignore_eos,
            eos_token_ids=eos,
            top_k=vllm_compat.top_k(body.top_k, greedy),
        )

    def token_budget(self, prompt: int, max_tokens: int | None, kind: str, body: _Common) -> int:
        """The max_new_tokens of a prompt's rows: `max_tokens` if it fits, else a 400 in OpenAI's terms. Unset,
        the room the prompt leaves (at most the checkpoint's default), as vLLM defaults it. A canvas takes all
        its positions while it denoises, so the room is counted in whole canvases (vLLM: in tokens)."""
        canvas, limit = self.llm.runner.canvas_length, self.llm.max_model_len
        room = max(limit - prompt, 0) // canvas * canvas
        if room == 0:
            raise ApiError(400, f"the prompt is {prompt:,} tokens: max_model_len {limit} leaves no room for an answer, "
                                f"which is counted in whole canvases of {canvas} tokens; shorten the prompt to at most "
                                f"{max(limit - canvas, 0):,} tokens", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            return min(self.llm.defaults.max_new_tokens, room)
        if max_tokens > room:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{name} {max_tokens} does not fit: max_model_len {limit} leaves {room} tokens after "
                                f"the prompt ({prompt:,} tokens), counted in whole canvases of {canvas} tokens; lower "
                                f"{name} to at most {room} or shorten the prompt", param=name,
                           code="context_length_exceeded")
        return max_tokens

    def make_job(self, kind: str, body: _Common, prompts: list[list[int]], max_tokens: int | None,
                 chat: ChatOptions | None = None, media: list[list[MediaRun]] | None = None,
                 structured: StructuredOutputsParams | None = None) -> Job:
        model = self.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        rows_wanted = len(prompts) * body.n
        if rows_wanted > self.engine.capacity:
            raise ApiError(400, f"{rows_wanted} rows (prompts x n) can never fit: this server holds "
                                f"{self.engine.capacity} (--max-num-seqs + --max-queue)", param="n")
        if structured is not None and getattr(body, "stop_token_ids", None):
            raise ApiError(400, "stop_token_ids cannot be combined with structured output (or tool_choice required / "
                                "named): a stop id inside the constrained answer would cut it", param="stop_token_ids",
                           code="unsupported")
        job_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        stream = RequestStream(self.loop)
        rows = []
        for p, prompt in enumerate(prompts):
            budget = self.token_budget(len(prompt), max_tokens, kind, body)
            for j in range(body.n):
                index = p * body.n + j
                params = self.sampling_params(body, budget, j)
                params.structured_outputs = structured  # letterpress.structured: compiled once, cached
                try:
                    request = self.llm.make_request(prompt, params, listener=stream.listener(index),
                                                    want_drafts=body.wants_preview(), request_id=f"{job_id}-{index}",
                                                    media=media[p] if media else None)
                except SchemaError as e:  # the constraint cannot be compiled (a bad regex): name the field
                    e.param = e.param or structured_param(body)
                    raise
                except RequestError as e:  # too few tokens for the constraint: name the field the client used
                    if e.param == "max_tokens" and getattr(body, "max_completion_tokens", None):
                        e.param = "max_completion_tokens"
                        e.args = (str(e).replace("max_tokens", "max_completion_tokens", 1),)
                    raise
                # check() only reads fixed sizes (canvas length, max_model_len, vocab), so calling it here, off
                # the engine thread, is safe; it lets a too-long prompt get its 400 before any streaming starts.
                self.llm.scheduler.check(request)
                rows.append(request)
        tokenizer = self.llm.tokenizer
        # chat output keeps its special tokens: the parser finds thoughts and tool calls by them (and with vLLM's
        # skip_special_tokens false leaves the others in the content too)
        skip = chat is None and body.skip_special_tokens is not False
        if chat is not None and body.skip_special_tokens is False:
            chat = dataclasses.replace(chat, hidden=())
        decode = functools.partial(tokenizer.decode, skip_special_tokens=skip)
        texts = [ChoiceText(decode, body.stop_strings()) for _ in rows]
        log.info("%s: %d row(s), %s prompt tokens, user=%s", job_id, len(rows), "+".join(str(len(p)) for p in prompts),
                 body.user)
        return Job(job_id, kind, model, prompts, rows, texts, stream,
                   chat=None if chat is None else [ChatChoice(chat) for _ in rows])

    def submit(self, job: Job) -> None:
        if self.draining:
            raise shutting_down_error()
        try:
            self.engine.submit(job.stream, job.rows, job.tasks)
        except QueueFull:
            raise ApiError(429, "the server is at capacity (all slots busy and the queue full); retry later",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        self.open_jobs.add(job)

    # ------------------------------------------------------------------------------------------ shutdown
    async def shut_down(self, timeout: float) -> None:
        """Refuse new requests (503), wait up to `timeout` seconds for the open ones, then end those that are
        still running: a stream gets a last error event, a waiting request a 503. Returns once every handler
        has answered (or after a few more seconds, for a client that does not read)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info("shutting down: new requests get 503; waiting up to %gs for %d open request(s)", timeout,
                 len(self.open_jobs))
        deadline = loop.time() + timeout
        while self.open_jobs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.open_jobs:
            log.warning("--shutdown-timeout (%gs) is up: ending %d open request(s)", timeout, len(self.open_jobs))
            for job in list(self.open_jobs):
                job.stream.queue.put_nowait((0, ShuttingDown("the server is shutting down; the request was "
                                                             "cut short (retry on another server)")))
            deadline = loop.time() + 5.0
            while self.open_jobs and loop.time() < deadline:
                await asyncio.sleep(0.02)

    async def serve(self, raw: HttpRequest, job: Job, body: _Common):
        """Submit a job's rows and answer: one JSON body, or an SSE stream."""
        self.name_job(raw, job)
        self.submit(job)
        if body.stream:
            return JobStream(self.sse(raw, job, body), functools.partial(self.release, job),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self.collect(raw, job))

    def name_job(self, raw: HttpRequest, job: Job) -> None:
        """As vLLM: a client's X-Request-Id names the response (`chatcmpl-<id>`). The rows keep their own
        unique ids, so two requests that send the same header do not collide in the engine."""
        given = vllm_compat.request_id(raw.headers)
        if given is not None:
            job.id = job.id.split("-", 1)[0] + "-" + given

    def release(self, job: Job) -> None:
        """Free what is left of a job (its unfinished rows, its place among the open jobs); idempotent."""
        self.abort_unfinished(job)
        self.open_jobs.discard(job)

    # ------------------------------------------------------------------------------------------ responses
    async def drain(self, raw: HttpRequest, job: Job) -> bool:
        """Wait for every row of a job (aborting them if the client leaves); False when it left."""
        watcher = asyncio.create_task(self.watch_disconnect(raw, job))
        try:
            async for _ in job.events(self.engine):
                pass
        finally:
            watcher.cancel()
            self.abort_unfinished(job)
            self.open_jobs.discard(job)
        return all(out is not None for out in job.outputs)

    async def collect(self, raw: HttpRequest, job: Job) -> dict:
        if not await self.drain(raw, job):
            return {}  # the client went away; nobody reads this
        choices = []
        reasons = ["stop"] * len(job.groups) if job.groups is not None else job.finish_reasons
        for i, (row, reason) in enumerate(zip(job.choice_rows(), reasons)):
            text = job.texts[row]
            if job.kind == "chat":
                chat = job.chat[row]
                chat.feed(text.text)
                chat.finish()
                choices.append({"index": i, "message": chat.message(), "logprobs": None,
                                "finish_reason": chat.finish_reason(reason)})
            else:
                choices.append({"index": i, "text": text.text, "logprobs": None, "finish_reason": reason})
        self.log_done(job)
        return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                "created": job.created, "model": job.model, "choices": choices, "usage": job.usage()}

    async def sse(self, raw: HttpRequest, job: Job, body: _Common) -> AsyncIterator[str]:
        watcher = asyncio.create_task(self.watch_disconnect(raw, job))
        with_usage = body.wants_usage_chunk()
        try:
            if job.kind == "chat":  # OpenAI opens every chat choice with the role
                for i in range(len(job.rows)):
                    yield sse_data(self.chunk(job, i, {"role": "assistant", "content": ""}, None, with_usage))
            async for event, index, payload in job.choice_events(self.engine):
                if event == "text" and job.kind == "chat":
                    for delta in job.chat[index].feed(payload):
                        yield sse_data(self.chunk(job, index, delta, None, with_usage))
                elif event == "text":
                    yield sse_data(self.chunk(job, index, payload, None, with_usage))
                elif event == "finish" and job.kind == "chat":
                    for delta in job.chat[index].finish():
                        yield sse_data(self.chunk(job, index, delta, None, with_usage))
                    reason = job.chat[index].finish_reason(payload)
                    yield sse_data(self.chunk(job, index, {}, reason, with_usage))
                elif event == "finish":
                    yield sse_data(self.chunk(job, index, "", payload, with_usage))
                else:
                    yield self.preview(job, index, payload)
            if any(out is None for out in job.outputs):
                return  # the client went away
            if with_usage:
                yield sse_data({**self.chunk(job, 0, None, None, False), "choices": [], "usage": job.usage()})
            self.log_done(job)
            yield "data: [DONE]\n\n"
        except Exception as e:  # the 200 and some chunks are already out: report the error in-band
            if isinstance(e, ShuttingDown):
                yield sse_data(error_body(str(e), "server_error", code="shutting_down"))
            elif isinstance(e, ApiError):  # e.g. the request timed out
                yield sse_data(error_body(e.message, e.type, e.param, e.code))
            elif isinstance(e, RequestError):
                yield sse_data(error_body(str(e), "invalid_request_error", e.param))
            elif isinstance(e, EngineError):  # logged by the engine thread
                yield sse_data(error_body(str(e), "server_error"))
            else:
                log.exception("%s failed while streaming", job.id)
                yield sse_data(error_body(f"internal error: {e}", "server_error"))
            yield "data: [DONE]\n\n"
        finally:  # also runs when starlette cancels us because the client disconnected
            watcher.cancel()
            self.release(job)

    def chunk(self, job: Job, index: int, delta: Any, finish_reason: str | None, with_usage: bool) -> dict:
        if job.kind == "chat":
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        out = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def preview(self, job: Job, index: int, event: CanvasEvent) -> str:
        """`event: denoising_preview`: the current argmax draft of the canvas being denoised. Its data is also
        a valid, empty chunk, so a client that does not look at event names (the `openai` package) sees a
        chunk with no content. The draft is cut where the committed canvas would be (first EOS, max_tokens)."""
        params = job.rows[index].params
        budget = params.max_new_tokens - len(job.texts[index].token_ids)
        draft = event.token_ids[:budget]
        eos = None if params.ignore_eos else next((i for i, t in enumerate(draft) if t in params.eos_token_ids), None)
        draft = draft if eos is None else draft[:eos]
        data = self.chunk(job, index, {} if job.kind == "chat" else "", None, False)
        decode = self.llm.tokenizer.decode
        data["denoising_preview"] = {"index": index, "canvas": event.canvas, "step": event.step,
                                     "accepted": event.accepted, "token_ids": draft, "text": decode(draft),
                                     # per position, for a live view (the playground page): each token's text and
                                     # whether this step accepted it
                                     "tokens": [decode([t]) for t in draft],
                                     "accepted_mask": (event.accepted_mask or [])[:len(draft)]}
        return "event: denoising_preview\n" + sse_data(data)

    # ------------------------------------------------------------------------------------ disconnects
    async def watch_disconnect(self, raw: HttpRequest, job: Job) -> None:
        """Poll the connection while the job runs; when the client is gone, free its rows at the next step.
        Also notices a dead engine loop, so that no handler waits forever."""
        while True:
            await asyncio.sleep(self.config.disconnect_poll_s)
            if self.engine.failed is not None:
                job.stream.queue.put_nowait((0, EngineError(f"the engine loop died: {self.engine.failed!r}")))
                return
            if await raw.is_disconnected():
                log.info("%s: client disconnected; aborting %d row(s)", job.id, len(job.unfinished_row_ids()))
                self.abort_unfinished(job)
                job.stream.queue.put_nowait((-1, DISCONNECTED))
                return

    def abort_unfinished(self, job: Job) -> None:
        ids = job.unfinished_row_ids()
        if ids:
            self.engine.abort(ids)

    def log_done(self, job: Job) -> None:
        u = job.usage()
        log.info("%s: done, %d completion tokens, %d canvas(es), %d denoising steps, finish %s", job.id,
                 u["completion_tokens"], u["letterpress"]["canvases"], u["letterpress"]["denoising_steps"],
                 ",".join(str(r) for r in job.finish_reasons))


class JobStream(StreamingResponse):
    """A StreamingResponse that releases its job however the response ends. The body generator's own
    `finally` is not enough: when the client has gone before the first byte, the response can end before the
    generator ever started (an ASGI 2.4 server raises OSError from the first `send`, which starlette turns
    into ClientDisconnect), and a generator that never started runs no `finally`: the job stayed among the
    open jobs, its rows denoising for nobody, and a graceful shutdown waited for it."""

    def __init__(self, content, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def sse_data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------------------------------------- errors
def shutting_down_error() -> ApiError:
    return ApiError(503, "the server is shutting down and takes no new requests", "server_error",
                    code="shutting_down")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


UNION_FIELDS = {
    "prompt": "a string, a list of token ids, or a list of strings or of token-id lists",
    "stop": "a string or a list of strings",
    "tool_choice": "a string or an object",
    "function_call": "a string or an object",
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one line, and the offending top-level field."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return f"'{'.'.join(loc)}' is not a parameter letterpress supports", param
    if param is None:
        return f"the request body must be a JSON object ({first.get('msg')})", None
    siblings = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == [param]]
    if len(siblings) > 1:  # a union: pydantic reports one error per alternative
        return f"'{param}' must be {UNION_FIELDS.get(param, 'of another type')}", param
    return f"'{'.'.join(loc)}': {first.get('msg')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value" if param else None)

    @app.exception_handler(LetterpressError)
    async def letterpress_error(_, exc: LetterpressError):
        if isinstance(exc, NotSupportedError):
            return error_response(400, str(exc), code="unsupported")
        if isinstance(exc, RequestError):
            return error_response(400, str(exc), param=exc.param)
        log.error("server-side error: %s", exc)
        return error_response(500, str(exc), "server_error")

    @app.exception_handler(ShuttingDown)
    async def shutting_down(_, exc: ShuttingDown):
        return error_response(503, str(exc), "server_error", code="shutting_down")

    @app.exception_handler(EngineError)
    async def engine_error(_, exc: EngineError):  # already logged, with its traceback, by the engine thread
        return error_response(500, str(exc), "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error", headers=getattr(exc, "headers", None))


class Edge:
    """Pure ASGI middleware around everything: counts responses by status, checks the API key on /v1 and on
    /tokenize and /detokenize (never on a CORS preflight, which carries no credentials), refuses
    new work while shutting down, and turns any exception that escaped the handlers into a logged 500 JSON
    error (the server never dies).

    A response is counted when it ends, as 499 (nginx's "client closed request") when the client went away
    before the whole response was sent, however it started (a stream starts with a 200)."""

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server
        self.metrics, self.api_key = server.metrics, server.config.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"status": None, "complete": False, "left": False}

        async def watching_receive():
            message = await receive()
            if message["type"] == "http.disconnect" and not state["complete"]:
                state["left"] = True
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.handle(scope, watching_receive, counting_send, state)
        finally:
            status = 499 if state["left"] else state["status"]
            if status is not None:
                self.metrics.count_response(status)

    async def handle(self, scope, receive, send, state) -> None:
        v1 = scope["path"].startswith("/v1")
        guarded = v1 or scope["path"] in ("/tokenize", "/detokenize")  # vLLM leaves these two open
        if self.api_key and guarded and scope["method"] != "OPTIONS" and not self.authorized(scope):
            response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        if self.server.draining and v1 and scope["method"] == "POST":
            error = shutting_down_error()
            return await error_response(503, error.message, error.type, code=error.code)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:  # the client left mid-request; its rows were aborted by the handler
            state["left"] = True
        except Exception as e:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if state["status"] is None:
                await error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")(
                    scope, receive, send)

    def authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


# ------------------------------------------------------------------------------------------------ routes
def build_app(llm: LLM, config: ServerConfig) -> FastAPI:
    """The ASGI app; the engine thread starts and stops with it (lifespan)."""
    from contextlib import asynccontextmanager

    server = OpenAIServer(llm, config)

    @asynccontextmanager
    async def lifespan(_):
        server.loop = asyncio.get_running_loop()
        server.engine.start()
        try:
            yield
        finally:  # also when the loop is cancelled (Ctrl-C in run-batch): the engine thread must not outlive it
            server.engine.stop()
            for pool in (server.prep, server.media_prep):
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="letterpress", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(Edge, server=server)
    # outside Edge: a 401 or 500 carries the CORS and X-Request-Id headers too, and preflights need no key
    app.add_middleware(vllm_compat.RequestIdHeader, always=config.enable_request_id_headers)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, **vllm_compat.cors_options(
            config.allowed_origins, config.allowed_methods, config.allowed_headers, config.allow_credentials))

    # HEAD answers like GET without a body (uvicorn drops the body of a HEAD response)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if server.engine.healthy and not server.draining:
            return PlainTextResponse("ok")
        state = ("shutting down" if server.draining else "engine failed" if server.engine.failed is not None
                 else "warming up")
        return error_response(503, state, "server_error")

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return PlainTextResponse(server.metrics.render(config.served_model_names[0]),
                                 media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_card(name, llm.model_name, server.created, llm.max_model_len)
                                           for name in config.served_model_names]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        server.check_model(model)
        return model_card(model, llm.model_name, server.created, llm.max_model_len)

    # Bodies are read and parsed by `server.read` (size limit, strict JSON) and every request is prepared
    # (template, tokenizer, planning) on a preparation thread: the event loop only moves bytes.
    @app.post("/v1/completions")
    async def completions(raw: HttpRequest):
        body = await server.read(raw, CompletionRequest)
        refuse_unsupported(body)
        if body.infill_strategy is not None and not body.suffix:  # refused, never ignored
            raise ApiError(400, "infill_strategy applies to infilling: send it with a non-empty suffix",
                           param="infill_strategy")
        if body.rule_mask == "sudoku":  # the rule-mask search, run by the engine thread (server/sudoku.py)
            job = await server.off_loop(sudoku_job, server, body)
        elif body.suffix:  # infilling: the completion is the middle (an empty suffix is a plain completion)
            job = await server.off_loop(infill_job, server, body)
        else:
            job = await server.off_loop(server.completion_job, body)
        return await server.serve(raw, job, body)

    @app.post("/v1/edits")
    async def edits(raw: HttpRequest):
        body = await server.read(raw, EditRequest)
        job, plans = await server.off_loop(edit_job, server, body)
        server.name_job(raw, job)
        server.submit(job)
        if not await server.drain(raw, job):
            return JSONResponse({})  # the client went away; nobody reads this
        return JSONResponse(edit_response(server, job, plans))

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: HttpRequest):
        body = await server.read(raw, ChatCompletionRequest)
        refuse_unsupported(body)
        job = await server.off_loop(server.chat_job, body, media=has_media(body.messages))
        return await server.serve(raw, job, body)

    # vLLM's tokenizer routes and version (server/vllm_compat.py)
    @app.post("/tokenize")
    async def tokenize(raw: HttpRequest):
        data = await read_body(raw, server.config.max_request_bytes, llm.vision is not None)
        body = await server.off_loop(vllm_compat.tokenize_body, data)
        media = has_media(getattr(body, "messages", None))
        return await server.off_loop(vllm_compat.tokenize, server, body, media=media)

    @app.post("/detokenize")
    async def detokenize(raw: HttpRequest):
        body = await server.read(raw, vllm_compat.DetokenizeRequest)
        return await server.off_loop(vllm_compat.detokenize, server, body)

    @app.api_route("/version", methods=["GET", "HEAD"])
    async def version():
        from .. import __version__

        return {"version": __version__}

    install_playground(app)  # GET /: the playground page (server/page.py, server/static/)
    return app
