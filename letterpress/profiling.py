"""`--profile DIR`: a torch profiler trace (chrome trace JSON, open in chrome://tracing or Perfetto) of the
first N engine steps.

`StepProfiler(folder, steps).attach(runner)` wraps the runner's `step` (and, as named ranges inside it, the
encode / denoise / sample phases and the model's `encode` / `denoise`) without changing the runner: the
profiler starts at the first step and the trace is written after the N-th, or at exit if fewer ran.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def anon_rss_bytes() -> int:
    """This process's anonymous resident memory (Linux RssAnon): heap and anonymous maps, not the page cache
    of mmapped files such as safetensors shards."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) * 1024


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; a no-op with another libc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_anon_rss(fn: Callable[[], Any], interval_s: float = 0.002) -> tuple[Any, int]:
    """Run `fn` while a thread samples RssAnon every `interval_s`; return (fn's result, peak bytes above the
    level before the call). Used by the loading-memory tests and benchmarks/load_memory.py.

    The level before is taken after a garbage collection and a malloc_trim, so heap pages that earlier work
    freed but glibc still held are not in the baseline (they would make room for `fn` and hide part of its
    peak, by an amount that varies from run to run)."""
    gc.collect()
    trim_heap()
    peak, done = [anon_rss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(anon_rss_bytes())
            time.sleep(interval_s)

    before = anon_rss_bytes()
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak) - before


class StepProfiler:
    def __init__(self, folder: str | Path, steps: int = 8):
        if steps <= 0:
            raise ValueError("profile steps must be positive")
        self.folder = Path(folder)
        self.steps = steps
        self.done = 0
        self.profiler: profile | None = None
        self.path: Path | None = None

    def attach(self, runner) -> "StepProfiler":
        self.folder.mkdir(parents=True, exist_ok=True)
        for obj, name, label in ((runner, "_encode", "letterpress.encode"), (runner, "_denoise", "letterpress.denoise"),
                                 (runner.model, "encode", "model.encode"), (runner.model, "denoise", "model.denoise")):
            if hasattr(obj, name):
                setattr(obj, name, _labelled(getattr(obj, name), label))
        step = runner.step

        @functools.wraps(step)
        def profiled_step(rows):
            if self.done >= self.steps:
                return step(rows)
            if self.profiler is None:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.profiler = profile(activities=activities, record_shapes=True)
                self.profiler.__enter__()
                atexit.register(self.finish)
            with record_function(f"letterpress.step {self.done}"):
                out = step(rows)
            self.done += 1
            if self.done >= self.steps:
                self.finish()
            return out

        runner.step = profiled_step
        return self

    def finish(self) -> Path | None:
        if self.profiler is None or self.path is not None:
            return self.path
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.path = self.folder / f"letterpress-trace-{os.getpid()}.json"
        self.profiler.export_chrome_trace(str(self.path))
        print(f"profile: {self.done} step(s) written to {self.path}", file=sys.stderr)
        return self.path


def _labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


class AllocationPeak:
    """Peak bytes allocated inside a `with` block and live at the same time, counted from every allocation
    of torch's CPU allocator (op-internal buffers included, e.g. torch.multinomial's noise) by the torch
    profiler's memory events; on CUDA, torch.cuda.max_memory_allocated. Tensors that existed before the
    block are not counted, and freeing them does not make room: `peak` is what the block itself added at
    its highest point. Deterministic (sizes, not timings). Allocations on other threads are not seen, so
    measure with one intra-op thread on CPU.

    >>> with AllocationPeak() as m: ...
    >>> m.peak  # bytes
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0
        self._profiler: profile | None = None

    def __enter__(self) -> "AllocationPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self._profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        # Replay the allocation events in order, counting only blocks allocated inside the block. (The
        # allocator's own "Total Allocated" is not usable: it drifts when a block allocated under an earlier
        # profiler is freed without one.)
        memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
        live: dict[int, int] = {}
        current = 0
        for e in memory:
            addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
            if nbytes > 0:
                live[addr] = nbytes
                current += nbytes
                self.peak = max(self.peak, current)
            elif addr in live:
                current -= live.pop(addr)
