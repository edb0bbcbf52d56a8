"""`letterpress quantize MODEL OUT --format int8|int4|fp8`: write a quantized (compressed-tensors) checkpoint
that loads directly, without reading float weights (letterpress.quant_save)."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "write a quantized checkpoint (compressed-tensors layout) that loads without the float weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float checkpoint folder or Hub id")
    p.add_argument("out", help="folder to write (new, empty, or a checkpoint, which is replaced)")
    p.add_argument("--format", required=True, choices=["int8", "int4", "fp8"],
                   help="int8 (W8A16, per channel), int4 (W4A16, groups of 128), fp8 (FP8 dynamic)")


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL is a folder or a Hub id, OUT a folder that may be replaced."""
    from pathlib import Path

    from ..model_ref import check_replaceable, is_local_folder

    is_local_folder(args.model)
    check_replaceable(Path(args.out))


def run(args: argparse.Namespace) -> int:
    from ..quant_save import quantize_checkpoint

    start = time.perf_counter()
    out = quantize_checkpoint(args.model, args.out, args.format)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({args.format}, {size / 1e9:.3f} GB of weights) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0
