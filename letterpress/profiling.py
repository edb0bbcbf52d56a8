"""`--profile DIR`: a torch profiler trace (chrome trace JSON, open in chrome://tracing or Perfetto) of the
first N engine steps.

`StepProfiler(folder, steps).attach(runner)` wraps the runner's `step` (and, as named ranges inside it, the
encode / denoise / sample phases and the model's `encode` / `denoise`) without changing the runner: the
profiler starts at the first step and the trace is written after the N-th, or at exit if fewer ran.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


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
