"""Find, download, validate and load a DiffusionGemma checkpoint (config.json + safetensors) into our model.

Accepts what transformers writes (shared encoder/decoder weights stored once, under the decoder's names)
and checkpoints that store them under the encoder's names or twice. The model is built on the `meta`
device and every tensor is read straight into its final dtype and device, so loading needs about one
model's worth of memory, not two.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import load_model_config
from .errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16")
    return DTYPES[dtype]


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("LETTERPRESS_OFFLINE", "HF_HUB_OFFLINE"))


def resolve(path_or_id: str | Path, offline: bool | None = None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (with progress bars) into the Hub cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such checkpoint folder (and not a Hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to download from the Hub") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=is_offline(offline)))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name} is not in the local Hub cache and offline mode is on") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not download {name} from the Hub: {e}") from None
    except OSError as e:
        raise CheckpointError(f"could not download {name}: {e}") from None


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every stored tensor name to its file, from the shard index or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard.name} is listed in {INDEX_FILE} but missing from {folder}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


class _open:
    """safe_open with errors that name the file (a truncated file fails here, or at get_tensor)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{self.path.name} is not a readable safetensors file ({e})") from None
        return self.handle.__enter__()

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


# Our parameter name -> the names a checkpoint may store it under, first found wins.
def candidate_names(ours: str) -> list[str]:
    prefixes = ["model.decoder.", "model.encoder.language_model.", "decoder.", "encoder.language_model."]
    if ours == "embed_tokens.weight":
        names = [p + ours for p in prefixes] + ["lm_head.weight"]
    elif ours.startswith("self_conditioning."):
        names = ["model.decoder." + ours, "decoder." + ours]
    elif ours.endswith(".encoder_scalar"):
        layer = ours.rsplit(".", 1)[0]
        names = [f"model.encoder.language_model.{layer}.layer_scalar", f"encoder.language_model.{layer}.layer_scalar"]
    elif ours.endswith(".decoder_scalar"):
        layer = ours.rsplit(".", 1)[0]
        names = [f"model.decoder.{layer}.layer_scalar", f"decoder.{layer}.layer_scalar"]
    else:
        names = [p + ours for p in prefixes]
    return names


def load_model(path_or_id: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
               offline: bool | None = None, revision: str | None = None):
    from .model import DiffusionGemma

    folder = resolve(path_or_id, offline=offline, revision=revision)
    config = load_model_config(folder)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
    model = model.to_empty(device=device)
    model.init_rope()
    load_weights(model, folder)
    model.checkpoint_dir = folder
    return model.eval()


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copy every parameter and layer scalar from the checkpoint into `model`, casting to the model's dtype."""
    files = weight_files(folder)
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if not n.startswith("inv_freq")})
    plan: dict[Path, list[tuple[str, str]]] = {}
    for ours in targets:
        stored = next((n for n in candidate_names(ours) if n in files), None)
        if stored is None:
            if ours.endswith("_scalar"):
                # A buffer that starts at 1.0 in the reference too; a checkpoint may omit it.
                log.warning("%s: %s not in checkpoint, using 1.0", folder.name, candidate_names(ours)[0])
                targets[ours].data.fill_(1.0)
                continue
            raise CheckpointError(f"{folder}: tensor {candidate_names(ours)[0]} is missing from the checkpoint")
        plan.setdefault(files[stored], []).append((ours, stored))

    progress = tqdm(total=sum(len(v) for v in plan.values()), desc=f"loading {folder.name}", unit="tensor",
                    disable=None, leave=False)  # disable=None: shown on a terminal only
    for path, items in sorted(plan.items()):
        with _open(path) as f:
            for ours, stored in items:
                progress.update()
                target = targets[ours]
                try:
                    shape = tuple(f.get_slice(stored).get_shape())
                except Exception as e:
                    raise CheckpointError(f"{path.name}: cannot read {stored} ({e})") from None
                if shape != tuple(target.shape):
                    raise CheckpointError(f"{path.name}: {stored} has shape {list(shape)}, "
                                          f"the config implies {list(target.shape)}")
                try:
                    tensor = f.get_tensor(stored)
                except Exception as e:  # truncated data section
                    raise CheckpointError(f"{path.name}: cannot read {stored}, is the file truncated? ({e})") from None
                target.data.copy_(tensor)
    progress.close()
    model.requires_grad_(False)


def checkpoint_names(ours: str) -> list[str]:
    """Where `save_model` writes one of our tensors: shared weights once under the decoder's names (as
    transformers does), each layer scalar under its own module."""
    if ours.endswith(".encoder_scalar"):
        return [f"model.encoder.language_model.{ours.rsplit('.', 1)[0]}.layer_scalar"]
    return [candidate_names(ours)[0]]


def _new_file_mode(folder: Path) -> int:
    """The permissions a new file gets in `folder` (0o666 less the umask), read off a probe file: calling
    os.umask() to read the umask would change it for a moment under the process's other threads."""
    probe = folder / ".mode-probe"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


@contextmanager
def atomic_folder(folder: Path):
    """Yield a temporary sibling folder to write into; on success it replaces `folder`, on any error (or an
    interruption) it is removed, so nothing half-written is ever left at `folder`. The folder and its files
    get the umask's permissions (`mkdir`, not `mkdtemp`; safetensors writes its files 0600, so they are
    widened to what any new file would get)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mode = _new_file_mode(tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# transformers 5.23 builds a vision tower for every DiffusionGemma: `vision_config: null` (or none) means its
# default, 167M-parameter tower, randomly initialised and reported as missing weights. A text-only checkpoint
# therefore gets the smallest tower transformers accepts (no layers, width 1; 3 tensors, 2 + 3 + hidden
# values) with those tensors stored as zeros, so transformers loads it with nothing missing. letterpress
# itself runs text only and never reads them.
PLACEHOLDER_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 0,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2, "patch_size": 1, "pooling_kernel_size": 1,
    "position_embedding_size": 1,
}
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def is_placeholder_vision(vision_config) -> bool:
    return isinstance(vision_config, dict) and all(vision_config.get(k) == v
                                                    for k, v in PLACEHOLDER_VISION_CONFIG.items())


def placeholder_vision_tensors(hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights of PLACEHOLDER_VISION_CONFIG's tower (zeros), under transformers' names."""
    vision = PLACEHOLDER_VISION_CONFIG
    width, patch = vision["hidden_size"], vision["patch_size"]
    return {
        "model.encoder.vision_tower.patch_embedder.position_embedding_table":
            torch.zeros(2, vision["position_embedding_size"], width, dtype=dtype),
        "model.encoder.vision_tower.patch_embedder.input_proj.weight": torch.zeros(width, 3 * patch * patch, dtype=dtype),
        "model.encoder.embed_vision.embedding_projection.weight": torch.zeros(hidden_size, width, dtype=dtype),
    }


def vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors stored in a checkpoint (letterpress does not load them)."""
    files = weight_files(folder)
    out = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                if name.startswith(VISION_PREFIXES):
                    out[name] = f.get_tensor(name)
    return out


def save_model(model: torch.nn.Module, folder: str | Path, config_dict: dict, generation_config: dict | None = None,
               extra_files: dict[str, Path] | None = None, vision_from: Path | None = None) -> Path:
    """Write `model` in the released checkpoint format: config.json, generation_config.json, model.safetensors
    (and copies of `extra_files`, e.g. the tokenizer). Written into a temporary folder first and renamed, so
    an interrupted save leaves nothing half-written.

    letterpress runs text only, so the vision tower is not part of `model`: with `vision_from` (the base
    checkpoint folder) its tensors are copied from there; a config without `vision_config` gets the
    placeholder tower above."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config_dict = dict(config_dict)
    with atomic_folder(folder) as tmp:
        state = {}
        tensors = dict(model.named_parameters())
        tensors.update({n: b for n, b in model.named_buffers() if not n.startswith("inv_freq")})
        for ours, tensor in tensors.items():
            for stored in checkpoint_names(ours):
                state[stored] = tensor.detach().to("cpu").contiguous()
        embed = tensors["embed_tokens.weight"]
        vision = config_dict.get("vision_config")
        if vision is None or is_placeholder_vision(vision):
            config_dict["vision_config"] = vision or dict(PLACEHOLDER_VISION_CONFIG)
            state.update(placeholder_vision_tensors(embed.shape[1], embed.dtype))
        elif vision_from is not None:
            state.update({k: v.to(embed.dtype) for k, v in vision_tensors(Path(vision_from)).items()})
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return folder
