"""The scheduler: admits waiting requests between steps, first come first served, when a row (at most
`max_num_seqs`) and the KV blocks of the request's worst case are free, less the cached prefix blocks it
shares (`PagedKVCache.admit`; the head of the queue waits otherwise), runs the runner, and hands back finished rows. `LLM.generate` feeds it
everything at once; the server feeds it from a queue.

Between steps it also stops the requests whose deadline (`Request.deadline`) has passed, waiting or
running: they finish with reason "timeout" and free their rows and blocks. A row that failed in a step (the
runner isolates faults to their rows) comes back with reason "error"."""

from __future__ import annotations

import math
import time
from collections import deque

from ..errors import RequestError
from .request import Request, RequestOutput
from .runner import Row, Runner


class Scheduler:
    def __init__(self, runner: Runner, max_num_seqs: int, max_model_len: int):
        self.runner = runner
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Row] = []
        self.free_slots = list(range(max_num_seqs))
        self.aborted: set[str] = set()
        # prompt tokens looked up in the prefix cache and found there, over admitted requests (for /metrics)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def check(self, request: Request) -> None:
        """Reject what can never fit: the context is budgeted as prompt + canvases x canvas_length."""
        if not request.prompt_token_ids:
            raise RequestError("the prompt is empty")
        canvas = self.runner.canvas_length
        prompt = len(request.prompt_token_ids)
        canvases = math.ceil(request.params.max_new_tokens / canvas)
        need = self.max_tokens(request)
        if need > self.max_model_len:
            raise RequestError(f"prompt ({prompt} tokens) + {canvases} canvas(es) of {canvas} = {need} tokens exceeds "
                               f"max_model_len {self.max_model_len}: {self.fit_hint(prompt, canvases)}")
        if not self.runner.cache.fits_alone(need):
            raise RequestError(
                f"{need} tokens (prompt + canvases) need more KV blocks than the whole cache pool has; raise "
                f"--kv-cache-memory, or shorten the prompt or lower max_new_tokens")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        request.check_clamps(canvas, vocab)  # requests built without LLM.make_request get the same checks
        self.check_media(request)

    def check_media(self, request: Request) -> None:
        """Media runs in order, inside the prompt, each at most one encoder chunk, with something to fill them."""
        end = 0
        for i, run in enumerate(request.media):
            if run.start < end or run.end > len(request.prompt_token_ids) or run.length < 1:
                raise RequestError(f"media run {i} ([{run.start}, {run.end})) overlaps another or lies outside the prompt")
            if run.length > self.runner.max_chunk:
                raise RequestError(f"image {i} has {run.length} soft tokens, more than one encoder chunk "
                                   f"({self.runner.max_chunk}) holds")
            if run.embeds is None:
                if self.runner.vision is None:
                    raise RequestError("this model has no vision tower: it cannot take images")
                if run.pixel_values is None or run.positions is None:
                    raise RequestError(f"media run {i} has neither pixels nor soft tokens")
            elif tuple(run.embeds.shape) != (run.length, self.runner.model.text_config.hidden_size):
                raise RequestError(f"media run {i}: soft tokens must be [{run.length}, "
                                   f"{self.runner.model.text_config.hidden_size}], got {list(run.embeds.shape)}")
            end = run.end

    def max_tokens(self, request: Request) -> int:
        """The most context a request can reach: its prompt plus every canvas it may write."""
        canvas = self.runner.canvas_length
        return len(request.prompt_token_ids) + math.ceil(request.params.max_new_tokens / canvas) * canvas

    def fit_hint(self, prompt: int, canvases: int) -> str:
        """What would make a request of `prompt` tokens and `canvases` canvases fit: only what can work."""
        canvas, room = self.runner.canvas_length, self.max_model_len
        options = []
        if prompt + canvas <= room:
            tokens = (room - prompt) // canvas * canvas
            options.append(f"lower max_new_tokens to at most {tokens}")
        if canvases * canvas < room:
            options.append(f"shorten the prompt to at most {room - canvases * canvas} tokens")
        elif canvas < room and prompt + canvas > room:  # both must shrink
            options.append(f"shorten the prompt to at most {room - canvas} tokens with max_new_tokens at most {canvas}")
        need = prompt + canvases * canvas
        if need <= self.runner.model.text_config.max_position_embeddings:  # else no max_model_len can hold it
            options.append(f"raise max_model_len (--max-model-len) to at least {need}")
        return ", ".join(options[:-1]) + (", or " if len(options) > 1 else "") + options[-1]

    def add(self, request: Request) -> None:
        self.check(request)
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Free a request's row at the next step (or drop it from the queue). An id that is neither waiting
        nor running (already finished, or never added) is ignored, so the set cannot grow stale."""
        if any(q.request_id == request_id for q in self.waiting) or any(
                r.request.request_id == request_id for r in self.running):
            self.aborted.add(request_id)

    def abort_all(self) -> None:
        """Abort every request waiting or running (chat's Ctrl-C): each comes back with finish_reason "abort" at
        the next step, so no step is cut in half. Safe to call from a signal handler (it only adds ids to a set)."""
        for request_id in [q.request_id for q in self.waiting] + [r.request.request_id for r in self.running]:
            self.aborted.add(request_id)

    def drop(self, request_ids: set[str]) -> None:
        """Remove these requests now, returning nothing for them: what `LLM.run` does when the call running them
        is interrupted (Ctrl-C, an exception from a listener that is not an Exception). A step cut in half may
        have left their rows half-updated, so they are not stepped again, only freed."""
        self.waiting = type(self.waiting)(q for q in self.waiting if q.request_id not in request_ids)
        self._release([r for r in self.running if r.request.request_id in request_ids])
        self.aborted -= request_ids

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        """Admit, run one step, and return the outputs of the rows that finished (or were aborted)."""
        finished = self._drop_aborted() + self._expire(time.perf_counter())
        self.runner.forget_stale_prefixes()
        self._admit()
        if self.running:
            self.runner.step(self.running)
        done = [r for r in self.running if r.finish_reason is not None]
        self._release(done)
        return finished + [r.output() for r in done]

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            request, slot = self.waiting[0], self.free_slots[0]
            media = [(run.start, run.end, run.digest) for run in request.media]
            cached = self.runner.cache.admit(slot, request.prompt_token_ids, self.max_tokens(request), media)
            if cached is None:  # not enough free blocks yet: wait for running rows to finish
                break
            self.waiting.popleft()
            self.free_slots.pop(0)
            if self.runner.cache.enable_prefix_caching:
                self.prefix_cache_queries += len(request.prompt_token_ids)
                self.prefix_cache_hits += cached
            self.running.append(Row(request=request, slot=slot, pending=list(request.prompt_token_ids[cached:]),
                                    num_cached_tokens=cached))

    def _drop_aborted(self) -> list[RequestOutput]:
        if not self.aborted:
            return []
        out = []
        for request in [q for q in self.waiting if q.request_id in self.aborted]:
            self.waiting.remove(request)
            out.append(Row(request=request, slot=-1, pending=[], finish_reason="abort").output())
        rows = [r for r in self.running if r.request.request_id in self.aborted]
        for row in rows:
            row.finish_reason = "abort"
        self._release(rows)
        self.aborted.clear()
        return out + [r.output() for r in rows]

    def _expire(self, now: float) -> list[RequestOutput]:
        """Stop the requests whose deadline has passed; a running one keeps the canvases it committed."""
        expired = [q for q in self.waiting if q.deadline is not None and now >= q.deadline]
        for request in expired:
            self.waiting.remove(request)
        rows = [r for r in self.running if r.request.deadline is not None and now >= r.request.deadline]
        for row in rows:
            row.finish_reason = "timeout"
        self._release(rows)
        waited = [Row(request=q, slot=-1, pending=[], finish_reason="timeout").output() for q in expired]
        return waited + [r.output() for r in rows]

    def _release(self, rows: list[Row]) -> None:
        for row in rows:
            self.running.remove(row)
            self.runner.cache.free(row.slot)
            self.free_slots.append(row.slot)
        self.free_slots.sort()
