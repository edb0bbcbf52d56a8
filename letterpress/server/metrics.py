"""Prometheus metrics in the text exposition format, with no client library.

Written from two threads (the engine thread counts steps, tokens and canvases; the asyncio thread counts
HTTP responses), read by GET /metrics; one lock keeps each update and the rendering consistent.
"""

from __future__ import annotations

import threading
import time
from collections import deque

TOKENS_PER_FORWARD_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
STEPS_PER_CANVAS_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
RATE_WINDOW_S = 10.0  # the steps/s and tokens/s gauges average over this window


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for upper, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{upper}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.responses: dict[str, int] = {}  # HTTP status -> count (499: the client left first)
        self.finished_rows: dict[str, int] = {}  # finish reason -> count
        self.decoder_steps = 0  # batched denoise calls
        self.tokens = 0  # committed completion tokens
        self.tokens_per_forward = Histogram(TOKENS_PER_FORWARD_BUCKETS)
        self.steps_per_canvas = Histogram(STEPS_PER_CANVAS_BUCKETS)
        self.samples: deque[tuple[float, int, int]] = deque()  # (time, decoder_steps, tokens) for the rates
        self.queue_length = 0  # set by the engine thread after each step
        self.running_rows = 0
        self.kv_cache_usage = 0.0  # fraction of the KV block pools' bytes rows hold
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, found there

    # ------------------------------------------------------------------------------------------- updates
    def count_response(self, status: int) -> None:
        with self.lock:
            self.responses[str(status)] = self.responses.get(str(status), 0) + 1

    def count_canvas(self, tokens: int, steps: int) -> None:
        with self.lock:
            self.tokens += tokens
            self.steps_per_canvas.observe(steps)

    def count_row(self, finish_reason: str, tokens_per_forward: float) -> None:
        with self.lock:
            self.finished_rows[finish_reason] = self.finished_rows.get(finish_reason, 0) + 1
            if finish_reason != "abort":
                self.tokens_per_forward.observe(tokens_per_forward)

    def after_step(self, decoder_steps: int, queue_length: int, running_rows: int, kv_cache_usage: float = 0.0,
                   prefix_cache_queries: int = 0, prefix_cache_hits: int = 0) -> None:
        with self.lock:
            self.decoder_steps = decoder_steps
            self.queue_length, self.running_rows = queue_length, running_rows
            self.kv_cache_usage = kv_cache_usage
            self.prefix_cache_queries, self.prefix_cache_hits = prefix_cache_queries, prefix_cache_hits
            now = time.monotonic()
            self.samples.append((now, self.decoder_steps, self.tokens))
            while self.samples and self.samples[0][0] < now - RATE_WINDOW_S:
                self.samples.popleft()

    # ------------------------------------------------------------------------------------------- output
    def _rates(self) -> tuple[float, float]:
        """Decoder steps/s and tokens/s over the last RATE_WINDOW_S seconds (0 when idle that long)."""
        now = time.monotonic()
        recent = [s for s in self.samples if s[0] >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0, 0.0
        t0, steps0, tokens0 = recent[0]
        span = max(now - t0, 1e-3)
        return (self.decoder_steps - steps0) / span, (self.tokens - tokens0) / span

    def render(self, model: str) -> str:
        with self.lock:
            steps_rate, tokens_rate = self._rates()
            out: list[str] = []

            def metric(name: str, kind: str, help: str, lines: list[str]) -> None:
                out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines])

            metric("letterpress_requests_total", "counter", "HTTP responses by status code, counted when they end; "
                   "499 (nginx's convention): the client went away before the whole response was sent.",
                   [f'letterpress_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())])
            metric("letterpress_finished_rows_total", "counter", "Engine rows that left, by finish reason.",
                   [f'letterpress_finished_rows_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.finished_rows.items())])
            metric("letterpress_queue_length", "gauge", "Rows waiting for a free slot.",
                   [f"letterpress_queue_length {self.queue_length}"])
            metric("letterpress_running_rows", "gauge", "Rows holding a slot (encoding or denoising, or a rule-mask "
                   "search).",
                   [f"letterpress_running_rows {self.running_rows}"])
            metric("letterpress_kv_cache_usage_perc", "gauge", "KV-cache usage, 0 to 1: the fraction of the block "
                   "pools' bytes that rows hold; cached blocks nobody holds count as free (vllm:kv_cache_usage_perc).",
                   [f"letterpress_kv_cache_usage_perc {self.kv_cache_usage:.6f}"])
            metric("letterpress_prefix_cache_queries_total", "counter", "Prompt tokens of admitted requests looked up "
                   "in the prefix cache (vllm:prefix_cache_queries; not counted with prefix caching off).",
                   [f"letterpress_prefix_cache_queries_total {self.prefix_cache_queries}"])
            metric("letterpress_prefix_cache_hits_total", "counter", "Of those, tokens found in the prefix cache: "
                   "not encoded again (vllm:prefix_cache_hits).",
                   [f"letterpress_prefix_cache_hits_total {self.prefix_cache_hits}"])
            metric("letterpress_decoder_steps_total", "counter", "Batched denoise calls (each pass of a rule-mask "
                   "search counts one).",
                   [f"letterpress_decoder_steps_total {self.decoder_steps}"])
            metric("letterpress_generation_tokens_total", "counter", "Completion tokens committed.",
                   [f"letterpress_generation_tokens_total {self.tokens}"])
            metric("letterpress_decoder_steps_per_second", "gauge",
                   f"Decoder steps/s over the last {RATE_WINDOW_S:g}s.",
                   [f"letterpress_decoder_steps_per_second {steps_rate:.3f}"])
            metric("letterpress_tokens_per_second", "gauge", f"Completion tokens/s over the last {RATE_WINDOW_S:g}s.",
                   [f"letterpress_tokens_per_second {tokens_rate:.3f}"])
            metric("letterpress_tokens_per_forward", "histogram", "Per finished row: tokens / decoder passes.",
                   self.tokens_per_forward.lines("letterpress_tokens_per_forward"))
            metric("letterpress_steps_per_canvas", "histogram", "Denoising steps each finished canvas took (a "
                   "rule-mask search: its passes, solved or not).",
                   self.steps_per_canvas.lines("letterpress_steps_per_canvas"))
            metric("letterpress_model_info", "gauge", "The served model.",
                   [f'letterpress_model_info{{model="{_label(model)}"}} 1'])
            return "\n".join(out) + "\n"
