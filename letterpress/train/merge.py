"""Merge a LoRA adapter into its base checkpoint and save the result in the released format.

Only an adapter that is the same in the encoder and decoder passes can be merged: both passes share every base
weight. This is the way to merge a letterpress adapter; PEFT's `merge_and_unload()` on transformers adds the
delta once per tied module, twice in all (see `lora.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import check_replaceable, parse_dtype, resolve, save_model, weight_files
from ..model import DiffusionGemma
from .lora import check_mergeable, load_adapter, merge_lora, refuse_quantized

# What a checkpoint folder may hold besides weights and configs; copied next to a saved model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint stores its floating-point weights in (float32 if unsure)."""
    files = weight_files(folder)
    name, path = next(iter(sorted(files.items())))
    with safe_open(str(path), framework="pt") as f:
        return _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), torch.float32)


def merge_adapter(model: str | Path, adapter: str | Path, output: str | Path, dtype: str | torch.dtype | None = None,
                  offline: bool | None = None) -> Path:
    check_replaceable(Path(output))  # before the work, not only when writing
    check_mergeable(adapter)
    base = resolve(model, offline=offline)
    refuse_quantized(base, json.loads((base / "config.json").read_text()), "merging an adapter")
    dtype = parse_dtype(dtype) if dtype is not None else stored_dtype(base)
    # Merge in float32 (W + s * B A), then cast once when saving.
    net = DiffusionGemma.from_pretrained(base, dtype=torch.float32)
    load_adapter(net, adapter)
    merge_lora(net).to(dtype)
    config = json.loads((base / "config.json").read_text())
    gen_file = base / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    extra = {name: base / name for name in TOKENIZER_FILES if (base / name).is_file()}
    return save_model(net, output, config, generation, extra, vision_from=base)
