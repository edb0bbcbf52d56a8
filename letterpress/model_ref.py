"""A model and a dtype as a user names them (`letterpress generate MODEL --dtype D`, `LLM(model, dtype=)`),
checked without torch: checkpoint.py loads with these names, and the CLI checks its arguments with them before
torch and the model load, so that a mistyped folder or dtype is refused at once."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

# every dtype name we take -> torch's name for it ("auto": the checkpoint's own, resolved where it loads)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def check_dtype_name(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")


def is_local_folder(path_or_id: str | Path) -> bool:
    """True for a folder; False for a Hub repo id (owner/name); a CheckpointError for anything else (a file,
    a path that does not exist)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return True
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such checkpoint folder (and not a Hub id of the form owner/name)")
    return False
