"""What the server's modules share: its configuration, a job (one HTTP request's rows) and the server as the
route helpers (server/infill.py, server/vllm_compat.py) see it, so that they need not import server/app.py,
which imports them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from ..engine.llm import LLM
from ..engine.request import Request, RequestOutput, SamplingParams
from ..media.sources import MediaLimits
from .chat import ChatChoice
from .engine_loop import EngineLoop, RequestStream
from .schemas import _Sampler, usage
from .text import ChoiceText

DISCONNECTED = object()  # pushed into a job's stream by the disconnect watcher
DEFAULT_STEP_CEILING = 1024  # --max-denoising-steps when not given (or the checkpoint's default, if larger)
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # --request-timeout: the openai client's own default timeout

@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_queue: int = 128
    # sampler defaults for requests that do not set them (None = the checkpoint's generation_config.json)
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    # the most denoising steps per canvas a request may ask for (more is a 400); requests that do not set
    # it get the checkpoint's default, capped at this. None: DEFAULT_STEP_CEILING
    max_denoising_steps: int | None = None
    # seconds a request may take from submission; then its rows are stopped and it gets a 504. None: no limit
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S
    disconnect_poll_s: float = 0.25  # how often a waiting handler checks that its client is still there
    # larger bodies get a 413. None: 2,000,000, plus one image at the image limit as a base64 data URL on a
    # checkpoint with a vision tower (body.default_max_request_bytes)
    max_request_bytes: int | None = None
    # vLLM's CORS flags (no origins: no CORS headers) and --enable-request-id-headers (server/vllm_compat.py)
    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    enable_request_id_headers: bool = False
    # image / video URLs: fetch size and time limits, the folder file:// URLs may read (--allowed-local-media-path)
    media_limits: MediaLimits = field(default_factory=MediaLimits)


# ------------------------------------------------------------------------------------------------- a job
@dataclass(eq=False)  # compared (and hashed, in OpenAIServer.open_jobs) by identity
class Job:
    """One HTTP request's rows. Choice i is row i; it is complete when its RequestOutput has arrived."""

    id: str
    kind: str  # "chat" or "completion"
    model: str
    prompts: list[list[int]]
    rows: list[Request]
    texts: list[ChoiceText]
    stream: RequestStream
    created: int = field(default_factory=lambda: int(time.time()))
    outputs: list[RequestOutput | None] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    # infill: the rows that compete for each choice (candidate middle lengths); None = one row per choice
    groups: list[list[int]] | None = None
    # chat: each row's parser (reasoning, content, tool calls)
    chat: list[ChatChoice] | None = None
    # rows the engine thread runs as tasks instead of scheduling them (server/sudoku.py): one per row, or None
    tasks: list[Any] | None = None
    # more entries of `usage.letterpress` (a Sudoku puzzle harder than the model was trained on: server/sudoku.py)
    usage_notes: dict[str, Any] = field(default_factory=dict)
    # the prompt of each row; None: rows come prompt by prompt, as many for each (n per prompt)
    row_prompts: list[int] | None = None

    def __post_init__(self):
        self.outputs = [None] * len(self.rows)
        self.finish_reasons = [None] * len(self.rows)

    def choice_rows(self) -> list[int]:
        """The row that answers each choice; with groups, the one the model was surest of (lowest mean
        entropy of its free positions at its last step). Call once every row has reported."""
        if self.groups is None:
            return list(range(len(self.rows)))
        return [min(g, key=lambda r: (self.outputs[r].final_entropy[0], r)) for g in self.groups]

    async def choice_events(self, engine: EngineLoop) -> AsyncIterator[tuple[str, int, Any]]:
        """`events()` per choice. Grouped rows compete, so nothing is final before all have finished: then
        each choice's whole text and its finish reason come at once ("stop": the middle meets the suffix)."""
        if self.groups is None:
            async for event in self.events(engine):
                yield event
            return
        async for _ in self.events(engine):
            pass
        if any(out is None for out in self.outputs):
            return  # the client went away
        for i, r in enumerate(self.choice_rows()):
            yield "text", i, self.texts[r].text
            yield "finish", i, "stop"

    def unfinished_row_ids(self) -> list[str]:
        return [r.request_id for r, out in zip(self.rows, self.outputs) if out is None]

    async def events(self, engine: EngineLoop) -> AsyncIterator[tuple[str, int, Any]]:
        """Yield ("text", i, delta), ("preview", i, CanvasEvent) and ("finish", i, reason) until every row
        has reported back. A stop string ends a choice at once: its row is aborted and what it still sends
        is ignored (its RequestOutput is awaited only for the usage statistics, at most one step later)."""
        while any(out is None for out in self.outputs):
            index, item = await self.stream.get()
            if item is DISCONNECTED:
                return
            if isinstance(item, BaseException):
                raise item
            text = self.texts[index]
            if isinstance(item, RequestOutput):
                self.outputs[index] = item
                if self.finish_reasons[index] is None:
                    if item.finish_reason == "abort":
                        raise RuntimeError(f"row {item.request_id} was aborted by the engine")
                    delta = text.finish(item.token_ids)
                    if delta:
                        yield "text", index, delta
                    self.finish_reasons[index] = "stop" if text.stopped else item.finish_reason
                    yield "finish", index, self.finish_reasons[index]
            elif self.finish_reasons[index] is not None:
                continue  # the choice ended at a stop string; the row is on its way out
            elif not item.final:
                yield "preview", index, item
            else:
                delta = text.add_canvas(item.token_ids)
                if delta:
                    yield "text", index, delta
                if text.stopped:
                    engine.abort([item.request_id])
                    self.finish_reasons[index] = "stop"
                    yield "finish", index, "stop"

    def usage(self) -> dict:
        outs = [o for o in self.outputs if o is not None]
        passes = sum(o.decoder_passes for o in outs)
        stats = {
            "canvases": sum(o.canvases for o in outs),
            "denoising_steps": passes,
            # tokens_per_forward is valid tokens / passes per row; weighting by passes gives the job's ratio
            "tokens_per_forward": sum(o.tokens_per_forward * o.decoder_passes for o in outs) / max(passes, 1),
            "steps_per_canvas": [o.steps_per_canvas for o in outs],
        }
        completion = sum(self.texts[r].completion_tokens() for r in self.choice_rows())
        if self.groups is not None:  # every candidate row cost passes; only the chosen middles count
            stats["tokens_per_forward"] = completion / max(passes, 1)
        searches = [o.rule_mask for o in outs if getattr(o, "rule_mask", None)]  # rule_mask "sudoku": one row
        if searches:
            stats["rule_mask"] = searches[0]
        stats.update(self.usage_notes)
        prompt_tokens = sum(len(p) for p in self.prompts)
        out = usage(prompt_tokens, completion, stats)
        out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens()}
        return out

    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache, once per prompt: its rows share the prompt (with
        n > 1 each may find the same blocks), so it counts the most any of them found, capped at its length."""
        found = [0] * len(self.prompts)
        for r, out in enumerate(self.outputs):
            if out is not None:
                p = self.row_prompts[r] if self.row_prompts is not None else r * len(self.prompts) // len(self.rows)
                found[p] = max(found[p], out.num_cached_tokens)
        return sum(min(n, len(prompt)) for n, prompt in zip(found, self.prompts))


class ServerContext(Protocol):
    """The part of `OpenAIServer` (app.py) that the route helpers use."""

    llm: LLM
    config: ServerConfig
    engine: EngineLoop
    loop: asyncio.AbstractEventLoop | None

    step_ceiling: int
    sudoku_trained_givens: tuple[int, int] | None  # a Sudoku model's training range of givens, if it says

    def check_model(self, model: str | None) -> str: ...

    def check_chars(self, text: str, what: str, param: str | None = None) -> None: ...

    def sampling_params(self, body: _Sampler, max_tokens: int | None, index: int) -> SamplingParams: ...

    def make_job(self, kind: str, body: Any, prompts: list[list[int]], max_tokens: int | None) -> Job: ...
