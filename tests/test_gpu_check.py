"""benchmarks/gpu_check.sh cannot rot: its CPU dry run (tiny shape, every format and mode it runs by default)
finishes and prints a full table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the same python
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    skipped = [r for r in rows if "skipped" in r]
    assert not skipped, skipped
    # 3 formats x 2 batches x 2 contexts on the fast path, plus the plain path once
    assert len(rows) == 3 * 2 * 2 + 1
    assert {r["format"] for r in rows} == {"bf16", "fp8", "int4"} and {r["mode"] for r in rows} == {"fast", "plain"}
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 for r in rows)
    assert report["parity"]["sampler_bitwise"] is True
    assert report["parity"]["argmax_agreement"] > 0.5
    assert "% roofline" in done.stdout and "parity on cpu" in done.stdout
