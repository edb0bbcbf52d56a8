"""What the load-time weight checks cost: `load_model` with and without the NaN/inf check (`check_finite`),
on the shipped tiny_code model and on a larger random checkpoint, interleaved in one process.

    python benchmarks/load_checks.py                      # tiny_code + a ~270 MB float32 random model
    python benchmarks/load_checks.py --hidden 1024        # a larger one (~1 GB)

Also times the check alone over the loaded weights: the sum test letterpress uses (`count_non_finite`)
against the element-wise `isfinite(t).all()` and a float64-accumulated sum (the candidates it beat).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import interleaved, machine, median, ratio, set_threads

from letterpress.checkpoint import count_non_finite, save_model
from letterpress.config import model_config_from_dict
from letterpress.embedded import ASSETS
from letterpress.model import DiffusionGemma, load_model


def random_checkpoint(folder: Path, hidden: int, dtype: torch.dtype) -> Path:
    raw = {"model_type": "diffusion_gemma", "canvas_length": 16, "text_config": {
        "vocab_size": 32768, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 6,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": hidden // 8, "global_head_dim": hidden // 4,
        "num_global_key_value_heads": 2, "num_experts": 16, "top_k_experts": 2, "moe_intermediate_size": hidden,
        "sliding_window": 64}}
    model = DiffusionGemma(model_config_from_dict(raw)).init_weights(generator=torch.Generator().manual_seed(0))
    return save_model(model.to(dtype), folder, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random model (default 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine())
    tmp = Path(tempfile.mkdtemp(prefix="lp-load-checks-"))
    models = {"tiny_code (bf16 file, fp32 load)": ASSETS / "tiny_code",
              f"random hidden {args.hidden} (fp32)": random_checkpoint(tmp / "f32", args.hidden, torch.float32)}
    for label, folder in models.items():
        size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
        times = interleaved({"checked": lambda f=folder: load_model(f),
                             "unchecked": lambda f=folder: load_model(f, check_finite=False)}, args.repeats)
        checked, unchecked = median(times["checked"]), median(times["unchecked"])
        print(f"{label}: {size_mb:.0f} MB on disk; load {unchecked * 1000:.0f} ms unchecked, "
              f"{checked * 1000:.0f} ms checked (+{(ratio(times, 'checked', 'unchecked') - 1) * 100:.1f}% median "
              f"per-round ratio)")
        weights = [p.data for p in load_model(folder, check_finite=False).parameters()]
        gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
        check = interleaved({"count_non_finite (sum)": lambda: [count_non_finite(w) for w in weights],
                             "float64 sum": lambda: [bool(torch.isfinite(w.sum(dtype=torch.float64))) for w in weights],
                             "isfinite().all()": lambda: [bool(torch.isfinite(w).all()) for w in weights]},
                            args.repeats)
        for name, ts in check.items():
            print(f"  check alone, {name}: {median(ts) * 1000:.1f} ms for {gb:.2f} GB ({gb / median(ts):.1f} GB/s)")


if __name__ == "__main__":
    main()
