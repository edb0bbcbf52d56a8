"""Shared helpers for the benchmarks: shapes, random checkpoints, the machine line and interleaved timing.

Timing rule: the machines these run on are shared and noisy, so every benchmark compares candidates *in one
process*, interleaved round by round (A B C, B C A, ...), and reports medians plus the median of the
per-round ratios. Quote the ratios; absolute numbers move with the load on the machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Random DiffusionGemma text configs (transformers `DiffusionGemmaConfig.text_config` keys).
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 sliding_window=32, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
    "medium": dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                   sliding_window=128, num_experts=16, top_k_experts=4, moe_intermediate_size=128),
}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16)

from letterpress.quant import GEMMA4_26B_A4B_TEXT as REAL_26B  # noqa: E402,F401  (re-exported: the 26B text config)


def text_config(shape: dict):
    """Our `TextConfig` of a SHAPES-style dict of transformers text-config keys (REAL_26B, say)."""
    from letterpress.config import model_config_from_dict

    return model_config_from_dict({"model_type": "diffusion_gemma_text", **shape}).text


def build_checkpoint(shape: str | dict, canvas: int, folder: str | Path, seed: int = 0) -> Path:
    """Save a random transformers DiffusionGemma (the reference writes it; both engines load it)."""
    import logging

    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    text = SHAPES[shape] if isinstance(shape, str) else shape
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=canvas)
    DiffusionGemmaForBlockDiffusion(config).save_pretrained(folder)
    return Path(folder)


def checkpoint_for(shape: str, canvas: int) -> Path:
    """The benchmarks' `--shape`: "embedded" is the shipped default model, anything else a random checkpoint of
    that SHAPES entry written to a fresh temporary folder."""
    if shape == "embedded":
        from letterpress.embedded import default_model_dir

        return Path(default_model_dir())
    import tempfile

    return build_checkpoint(shape, canvas, tempfile.mkdtemp(prefix="lp-bench-"))


def model_from_resume_checkpoint(checkpoint: str | Path, base: str | Path):
    """(model, load_state_dict's missing and unexpected keys): the weights of a `letterpress train` resume
    checkpoint (torch.distributed.checkpoint) in a DiffusionGemma of `base`'s shape, a model folder of the same
    run (or of the same shape)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from letterpress.model import DiffusionGemma

    net = DiffusionGemma.from_pretrained(base)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(checkpoint, f"{tmp}/full.pt")
        state = torch.load(f"{tmp}/full.pt", weights_only=False)["model"]
    return net, net.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def machine() -> str:
    """CPU model (lscpu), cores, torch threads and version: the line to paste into BENCHMARKS.md."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every candidate `warmup` times, then `repeats` rounds in rotating order; seconds per call."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of slow/fast time: how many times faster `fast` is, robust to load changes."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
