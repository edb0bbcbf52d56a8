"""A model, a dtype and an output folder as a user names them (`letterpress generate MODEL --dtype D`,
`letterpress quantize MODEL OUT`, `LLM(model, dtype=)`), checked without torch: checkpoint.py loads and writes
with these checks, and the CLI runs them before torch and the model load, so that a mistyped folder or dtype is
refused at once."""

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


REPLACEABLE_MARKERS = ("config.json", "adapter_config.json")  # a checkpoint's, a LoRA adapter's


def check_replaceable(folder: Path) -> None:
    """An output folder that exists is replaced whole, so it must be one that can go: empty, or a checkpoint or
    adapter (it holds config.json or adapter_config.json). A file, a link or a folder of anything else (a
    mistyped path, the home folder) is refused, never deleted."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder: choose another output path")
    if any(folder.iterdir()) and not any((folder / name).is_file() for name in REPLACEABLE_MARKERS):
        raise CheckpointError(f"{folder} is not empty and is not a checkpoint (no {' or '.join(REPLACEABLE_MARKERS)}): "
                              "not replacing it; choose a new or empty folder")
