"""Running a benchmarks/ script's main() inside the test process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def benchmark_main(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run a benchmark script's main() in this process, for its argument checks without the seconds a fresh
    interpreter spends importing torch (tests/test_default_model.py also runs one as a command): (exit code,
    stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    threads = torch.get_num_threads()  # the scripts set their --threads
    try:
        with pytest.raises(SystemExit) as stop:
            module.main()
    finally:
        torch.set_num_threads(threads)
    return stop.value.code, capsys.readouterr().err
