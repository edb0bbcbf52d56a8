"""Loading peak versus quantized size: peak anonymous memory (RssAnon) while `load_model` runs, for a random
bf16 checkpoint of a few hundred MB, loaded in float, quantized while loading (`--quantization`), and from
the compressed-tensors checkpoint `letterpress quantize` writes.

Each load runs in a fresh subprocess that first pays torch's one-time meta-device imports (~70 MB, whatever
the model size) and then samples RssAnon every 2 ms. File pages (the mmapped safetensors) are reclaimable
page cache and not counted. Printed per row: the loaded model's bytes (parameters + buffers as held), the
peak above the baseline, and peak - model, the transient, next to the largest single float tensor of the
checkpoint (what quantizing while loading may hold at once; experts are read one slice at a time).

    python benchmarks/load_memory.py [--layers 6] [--hidden 1024] [--dtype bfloat16] [--formats int8,int4,fp8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine

CHILD = r"""
import sys, time, json
import torch
from letterpress.model import load_model
from letterpress.config import load_model_config
from letterpress.model import DiffusionGemma
from letterpress.profiling import peak_anon_rss
from letterpress.quant import model_bytes

with torch.device("meta"):  # one-time torch imports, paid before measuring
    DiffusionGemma(load_model_config(sys.argv[1]))

start = time.perf_counter()
model, peak = peak_anon_rss(lambda: load_model(sys.argv[1], dtype=sys.argv[2],
                                               quantization=None if sys.argv[3] == "none" else sys.argv[3]))
seconds = time.perf_counter() - start
print(json.dumps({"peak": peak, "model": model_bytes(model), "seconds": seconds}))
"""


def measure(folder: Path, dtype: str, fmt: str) -> dict:
    import json

    run = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, fmt], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--formats", default="int8,int4,fp8")
    args = parser.parse_args()

    import torch

    from letterpress.checkpoint import parse_dtype, save_model
    from letterpress.cli import main as cli_main
    from letterpress.config import model_config_from_dict
    from letterpress.model import DiffusionGemma
    from letterpress.quant import model_bytes

    h = args.hidden
    text = dict(vocab_size=args.vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=h // 8, global_head_dim=h // 4,
                num_global_key_value_heads=1, sliding_window=512, num_experts=args.experts, top_k_experts=4,
                moe_intermediate_size=h // 2)
    raw = {"model_type": "diffusion_gemma", "canvas_length": 32, "text_config": text}
    work = Path(tempfile.mkdtemp(prefix="lp-loadmem-"))
    model = DiffusionGemma(model_config_from_dict(raw)).init_weights().to(parse_dtype(args.dtype))
    float_bytes = model_bytes(model)
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    largest_2d = max(t.numel() * t.element_size() for t in model.state_dict().values() if t.ndim < 3)
    largest_slice = max(t[0].numel() * t.element_size() for t in model.state_dict().values() if t.ndim == 3)
    save_model(model, work / "float", raw)
    del model
    print(f"machine: {machine()}")
    print(f"random {args.dtype} checkpoint: {float_bytes / 1e6:.0f} MB ({args.layers} layers, hidden {h}, "
          f"{args.experts} experts, vocab {args.vocab}); largest tensor {largest / 1e6:.1f} MB (packed experts), "
          f"largest 2-D tensor {largest_2d / 1e6:.1f} MB (embedding), one expert slice {largest_slice / 1e6:.2f} MB\n")
    rows = [("float (" + args.dtype + ")", work / "float", "none")]
    for fmt in args.formats.split(","):
        rows.append((f"{fmt}, quantized while loading", work / "float", fmt))
        start = time.perf_counter()
        assert cli_main(["quantize", str(work / "float"), str(work / fmt), "--format", fmt]) == 0
        rows.append((f"{fmt}, from `letterpress quantize` ({time.perf_counter() - start:.0f} s to write)", work / fmt,
                     "none"))
    print("| load | model (MB) | peak (MB) | peak - model (MB) | peak / float model | load (s) |")
    print("|---|---|---|---|---|---|")
    for label, folder, fmt in rows:
        m = measure(folder, args.dtype, fmt)
        print(f"| {label} | {m['model'] / 1e6:.0f} | {m['peak'] / 1e6:.0f} | {(m['peak'] - m['model']) / 1e6:.0f} "
              f"| {m['peak'] / float_bytes:.2f} | {m['seconds']:.1f} |", flush=True)
    del torch


if __name__ == "__main__":
    main()
