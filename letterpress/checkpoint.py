"""Find, download, validate and load a DiffusionGemma checkpoint (config.json + safetensors) into our model.

Accepts what transformers writes (shared encoder/decoder weights stored once, under the decoder's names)
and checkpoints that store them under the encoder's names or twice. The model is built on the `meta`
device and every tensor is read straight into its final dtype and device, so loading needs about one
model's worth of memory, not two.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import ModelConfig
from .errors import CheckpointError, NotSupportedError
from .model_ref import DTYPE_NAMES, check_dtype_name, check_replaceable, is_local_folder
from .quant import QuantExperts, QuantLinear, QuantWeight, ct_check_config, ct_to_parts, quantizable

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}
# safetensors header dtype -> torch dtype, for the floating-point ones we read into float parameters.
# (F8 tensors come with scales that need their own loader, so they are not plain floats here.)
FLOAT_STORAGE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str, auto: torch.dtype | None = None) -> torch.dtype:
    """A torch dtype from its name. "auto" (transformers' and vLLM's name for "the checkpoint's own dtype")
    needs `auto`, the dtype found in the checkpoint (`checkpoint_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto" and auto is not None:
        return auto
    if dtype == "auto":
        raise CheckpointError("dtype 'auto' means the checkpoint's own dtype: pass it where a checkpoint is "
                              "loaded (LLM, DiffusionGemma.from_pretrained, --dtype auto)")
    check_dtype_name(dtype)
    return DTYPES[dtype]


def checkpoint_dtype(folder: Path, config: ModelConfig) -> torch.dtype:
    """What dtype="auto" loads in: the config's `dtype` (as transformers and vLLM do), else the dtype of the
    first floating-point tensor stored, else float32."""
    if config.dtype is not None:
        if config.dtype not in ("float32", "bfloat16", "float16"):
            raise CheckpointError(f"{folder / 'config.json'}: dtype {config.dtype!r} is not one letterpress runs "
                                  "in (float32, bfloat16, float16): choose one with --dtype / dtype=")
        return DTYPES[config.dtype]
    files = weight_files(folder)
    for name, path in sorted(files.items()):
        with _open(path) as f:
            stored = f.get_slice(name).get_dtype()
        if stored in FLOAT_STORAGE:
            return torch.float32 if stored == "F64" else FLOAT_STORAGE[stored]
    return torch.float32


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("LETTERPRESS_OFFLINE", "HF_HUB_OFFLINE"))


def resolve(path_or_id: str | Path, offline: bool | None = None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (with progress bars) into the Hub cache."""
    if is_local_folder(path_or_id):
        return Path(path_or_id).expanduser()
    name = str(path_or_id)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to download from the Hub") from None
    offline = is_offline(offline)
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(offline_message(name, offline, e)) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not download {name} from the Hub: {e}") from None
    except OSError as e:
        raise CheckpointError(f"could not download {name}: {e}") from None


def offline_message(name: str, offline: bool, error: Exception) -> str:
    """Why a Hub id could not be resolved from the cache: offline mode (and which switch set it), or a Hub
    that could not be reached although we tried (huggingface_hub raises the same error type for both)."""
    if offline:
        return (f"{name} is not in the local Hub cache and offline mode is on (--offline, LETTERPRESS_OFFLINE "
                "or HF_HUB_OFFLINE)")
    if _hub_offline_env():
        return (f"{name} is not in the local Hub cache and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so it "
                "cannot be downloaded")
    cause = error.__cause__ or error.__context__
    reason = f" ({type(cause).__name__})" if cause is not None else ""
    return (f"could not reach the Hub to download {name}{reason}, and it is not in the local Hub cache: check the "
            "network or HF_ENDPOINT, or pass a local checkpoint folder")


def _hub_offline_env() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every stored tensor name to its file, from the shard index or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(shard, str) and Path(shard).name == shard and shard not in ("", ".", "..")
                for shard in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in {folder}")
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


def allocate(model: torch.nn.Module, device: torch.device | str, folder: Path) -> torch.nn.Module:
    """`to_empty` with an allocation failure as a one-line error."""
    try:
        return model.to_empty(device=device)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        size_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9
        raise CheckpointError(f"{folder}: not enough memory on {device} for the model's {size_gb:.1f} GB") from None


def stored_quantization(folder: Path) -> dict | None:
    """config.json's `quantization_config`, checked to be one we load (compressed-tensors), or None."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None  # load_model_config has already reported a broken config.json
    if qc is None:
        return None
    try:
        ct_check_config(qc, folder.name)
    except NotSupportedError as e:
        raise CheckpointError(str(e)) from None
    return qc


@dataclass
class Stored:
    """Where one of our tensors is in the checkpoint: a float tensor `names["float"]`, or a quantized one
    (compressed-tensors): local name (weight, weight_packed, weight_scale, ...) -> stored name."""
    names: dict[str, str]

    @property
    def quantized(self) -> bool:
        return "weight_scale" in self.names


CT_LOCAL_NAMES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape")


def find_stored(ours: str, files: dict[str, Path]) -> Stored | None:
    """The first of `candidate_names(ours)` the checkpoint has, as a float tensor or as a quantized module
    (`prefix.weight_scale` next to `prefix.weight` or `prefix.weight_packed`; for packed experts the
    prefix is the parameter's own name)."""
    for name in candidate_names(ours):
        prefix = name[: -len(".weight")] if name.endswith(".weight") else name
        if f"{prefix}.weight_scale" in files:
            if f"{prefix}.weight_g_idx" in files:
                raise CheckpointError(f"{prefix} is stored with activation ordering (weight_g_idx), which "
                                      "letterpress does not load")
            return Stored({local: f"{prefix}.{local}" for local in CT_LOCAL_NAMES if f"{prefix}.{local}" in files})
        if name in files:
            return Stored({"float": name})
    return None


def plan_weights(model: torch.nn.Module, folder: Path, files: dict[str, Path]) -> dict[str, Stored]:
    """Our tensor name -> where the checkpoint stores it, for every parameter and persistent buffer."""
    targets = [n for n, _ in model.named_parameters()]
    targets += [n for n, _ in model.named_buffers() if not n.startswith("inv_freq")]
    plan = {}
    for ours in targets:
        stored = find_stored(ours, files)
        if stored is None:
            if ours.endswith("_scalar"):
                # A buffer that starts at 1.0 in the reference too; a checkpoint may omit it.
                log.warning("%s: %s not in checkpoint, using 1.0", folder.name, candidate_names(ours)[0])
                continue
            per_expert = [c for c in candidate_names(ours) if any(n.startswith(f"{c}.0.") or
                                                                  n.startswith(c.rsplit(".", 1)[0] + ".0.")
                                                                  for n in files)]
            if ours.endswith(("experts.gate_up_proj", "experts.down_proj")) and per_expert:
                raise CheckpointError(f"{folder}: the experts are stored one linear layer per expert "
                                      f"({per_expert[0].rsplit('.', 1)[0]}.0. ...); letterpress loads them packed "
                                      "(experts.gate_up_proj / experts.down_proj)")
            raise CheckpointError(f"{folder}: tensor {candidate_names(ours)[0]} is missing from the checkpoint")
        plan[ours] = stored
    return plan


def check_headers(model: torch.nn.Module, plan: dict[str, "Stored"], files: dict[str, Path]) -> None:
    """Check every float tensor's header against `model` (still on the meta device): its shape, and a
    floating-point dtype where the model holds floats. Reads headers only."""
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if not n.startswith("inv_freq")})
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for ours, stored in plan.items():
            name = stored.names.get("float")
            if name is None:
                continue  # stored quantized: checked when read (load_stored_quantized)
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(_open(path))
            try:
                header = handles[path].get_slice(name)
                shape, stored_dtype = tuple(header.get_shape()), header.get_dtype()
            except Exception as e:
                raise CheckpointError(f"{path.name}: cannot read {name} ({e})") from None
            if shape != tuple(targets[ours].shape):
                raise CheckpointError(f"{path.name}: {name} has shape {list(shape)}, "
                                      f"the config implies {list(targets[ours].shape)}")
            check_stored_dtype(path, name, stored_dtype, targets[ours])


def check_stored_dtype(path: Path, stored: str, stored_dtype: str, target: torch.Tensor) -> None:
    """Refuse a tensor whose header dtype cannot be cast to the target without changing its meaning: integer
    or boolean data where the model holds floats (copy_ would cast the integers silently)."""
    if target.is_floating_point() and stored_dtype not in FLOAT_STORAGE:
        raise CheckpointError(f"{path.name}: {stored} is stored as {stored_dtype}, but the model holds floating-point "
                              f"weights there (expected one of {', '.join(FLOAT_STORAGE)})")


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN / infinite values `tensor` holds. Any NaN or infinity makes the sum non-finite, so a finite
    sum (one vectorized reduction, no temporary: ~15x cheaper than isfinite(t).all(), benchmarks/load_checks.py)
    clears the tensor; a non-finite one (a bad value, or a sum that overflowed) gets the exact element count."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def non_finite_error(folder: Path, bad: list[tuple[str, str, int, int, str | None]]) -> CheckpointError:
    """One line for every tensor that held NaN/inf: (file, stored name, bad count, size, stored dtype if a
    cast to a narrower dtype made the values overflow)."""
    file, name, count, numel, cast_from = bad[0]
    more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
    hint = (f"; they overflowed when cast from {cast_from}: load in float32 or bfloat16" if cast_from
            else ": the checkpoint is corrupt (DiffusionGemma.from_pretrained(..., check_finite=False) loads it "
                 "anyway, to inspect it)")
    return CheckpointError(f"{folder}: {file}: {name} has {count} of {numel} values NaN or infinite{more}{hint}")


def swap_quantized_modules(model: torch.nn.Module, plan: dict[str, Stored], fmt: str | None) -> dict[str, QuantWeight]:
    """Replace (on the meta device) every linear layer and packed expert pair that the checkpoint stores
    quantized, or that `fmt` asks to quantize, by an empty quantized module. Returns our tensor name ->
    the QuantWeight that tensor fills. Routers, norms and the embedding stay float."""
    quantized: dict[str, QuantWeight] = {}

    pieces = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    for prefix, piece in pieces + [("self_conditioning", model.self_conditioning)]:
        for parent, name, child, full in quantizable(piece, prefix):
            if isinstance(child, torch.nn.Linear):
                if plan[f"{full}.weight"].quantized or fmt:
                    new = QuantLinear(child, fmt, empty=True)
                    setattr(parent, name, new)
                    quantized[f"{full}.weight"] = new.qweight
                continue
            parts = {"gate_up_proj": "gate_up", "down_proj": "down"}  # packed experts
            stored = [plan[f"{full}.{p}"].quantized for p in parts]
            if any(stored) and not all(stored) and not fmt:
                raise CheckpointError(f"{full}: one of the packed expert weights is quantized and the other "
                                      "is not; pass a quantization format for the float one")
            if any(stored) or fmt:
                new = QuantExperts(child, fmt, empty=True)
                setattr(parent, name, new)
                for p, attr in parts.items():
                    quantized[f"{full}.{p}"] = getattr(new, attr)
    stray = [n for n, s in plan.items() if s.quantized and n not in quantized]
    if stray:
        raise CheckpointError(f"{stray[0]} is stored quantized, but letterpress keeps it in float "
                              "(only linear layers of the text stack and the experts load quantized)")
    return quantized


def read_tensor(f, path: Path, stored: str, shape: tuple[int, ...] | None = None,
                expert: int | None = None) -> torch.Tensor:
    """Read one stored tensor (or expert `expert` of a 3-D one), checking its shape against `shape`. Every
    tensor the loader reads goes through here."""
    try:
        view = f.get_slice(stored)
        got = tuple(view.get_shape())
    except Exception as e:
        raise CheckpointError(f"{path.name}: cannot read {stored} ({e})") from None
    if shape is not None and got != tuple(shape):
        raise CheckpointError(f"{path.name}: {stored} has shape {list(got)}, the config implies {list(shape)}")
    try:
        return view[expert] if expert is not None else f.get_tensor(stored)
    except Exception as e:  # truncated data section
        raise CheckpointError(f"{path.name}: cannot read {stored}, is the file truncated? ({e})") from None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). Quantizing while loading
    frees float temporaries of many sizes between long-lived quantized tensors; glibc keeps such holes, and
    without this the process grew to ~2x the quantized model by the end of loading (benchmarks/load_memory.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class _ExpertSlices:
    """The [N, K] slices of a stored [E, N, K] float tensor, each read (and cast) only when indexed."""

    def __init__(self, f, path: Path, stored: str, shape: tuple[int, ...], dtype: torch.dtype, device,
                 check_finite: bool = True):
        read_tensor(f, path, stored, shape)  # checks the shape (reads the header only)
        self.f, self.path, self.stored, self.shape, self.dtype, self.device = f, path, stored, shape, dtype, device
        self.check_finite = check_finite
        self.non_finite = 0  # NaN/inf values seen in the slices read so far (after the cast)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        # The previous slice's float temporaries are free by now: give their pages back before reading the
        # next. Otherwise the next slice's temporaries land in other free holes of the heap (which ones
        # depends on the address-space layout) and touch fresh pages, growing the process by up to tens
        # of MB per tensor, more in some runs than others.
        _trim_heap()
        piece = read_tensor(self.f, self.path, self.stored, expert=e).to(self.device, self.dtype)
        self.non_finite += count_non_finite(piece) if self.check_finite else 0
        return piece


def load_weights(model: torch.nn.Module, folder: Path, plan: dict[str, Stored] | None = None,
                 quantized: dict[str, QuantWeight] | None = None, check_finite: bool = True) -> None:
    """Read every tensor of `plan` (default: every parameter and layer scalar of `model`) into the model:
    float tensors cast to the model's dtype, or quantized into the QuantWeight `quantized` maps them to,
    or taken as stored when the checkpoint stores them quantized. `check_finite`: float tensors holding
    NaN/inf (after the cast) are collected and refused together at the end."""
    files = weight_files(folder)
    plan = plan if plan is not None else plan_weights(model, folder, files)
    quantized = quantized or {}
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if not n.startswith("inv_freq")})
    for name, tensor in targets.items():
        if name.endswith("_scalar") and name not in plan:
            tensor.data.fill_(1.0)
    dtype, device = model.dtype, model.device
    progress = tqdm(total=len(plan), desc=f"loading {folder.name}", unit="tensor",
                    disable=None, leave=False)  # disable=None: shown on a terminal only
    bad: list[tuple[str, str, int, int, str | None]] = []  # tensors holding NaN/inf, reported together

    def check(f, path: Path, name: str, loaded: torch.Tensor, stored: torch.Tensor | None) -> None:
        count = count_non_finite(loaded) if check_finite else 0
        if count:  # finite as stored but not after the cast: the cast overflowed
            overflowed = stored is not None and count_non_finite(stored) == 0
            bad.append((path.name, name, count, loaded.numel(), f.get_slice(name).get_dtype() if overflowed else None))

    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(name: str):
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(_open(path))
            return handles[path], path

        # file by file, in stored order, so reads go through each file once
        for ours, stored in sorted(plan.items(), key=lambda kv: (str(files[next(iter(kv[1].names.values()))]), kv[0])):
            progress.update()
            if ours in quantized:
                qweight = quantized[ours]
                if stored.quantized:
                    load_stored_quantized(qweight, stored, handle, device)
                else:
                    name = stored.names["float"]
                    f, path = handle(name)
                    if len(qweight.shape) == 3:
                        slices = _ExpertSlices(f, path, name, qweight.shape, dtype, device, check_finite)
                        qweight.load_float(slices)
                        if slices.non_finite:
                            bad.append((path.name, name, slices.non_finite, math.prod(qweight.shape), None))
                    else:
                        weight = read_tensor(f, path, name, qweight.shape).to(device, dtype)
                        check(f, path, name, weight, None)
                        qweight.load_float(weight)
                        del weight
                _trim_heap()
                continue
            name = stored.names["float"]
            f, path = handle(name)
            target = targets[ours]
            tensor = read_tensor(f, path, name, tuple(target.shape))
            target.data.copy_(tensor)
            check(f, path, name, target.data, tensor)
    progress.close()
    if bad:
        raise non_finite_error(folder, bad)
    model.requires_grad_(False)


def load_stored_quantized(qweight: QuantWeight, stored: Stored, handle, device) -> None:
    """Fill `qweight` from a compressed-tensors module (weight_packed / weight / weight_scale / ...)."""
    tensors = {}
    for local, name in stored.names.items():
        f, path = handle(name)
        tensors[local] = read_tensor(f, path, name)
    where = f"{path.name}: {next(iter(stored.names.values())).rsplit('.', 1)[0]}"
    shape = qweight.shape
    if "weight_shape" in tensors and tuple(tensors["weight_shape"].tolist()) != shape:
        raise CheckpointError(f"{where} has weight_shape {tensors['weight_shape'].tolist()}, "
                              f"the config implies {list(shape)}")
    try:
        fmt, parts = ct_to_parts(tensors, shape)
    except NotSupportedError as e:
        raise CheckpointError(f"{where}: {e}") from None
    *lead, n, k = shape
    main = parts.get("q", parts.get("packed"))
    expected = (*lead, n, k) if "q" in parts else (*lead, n, k // 2)
    if tuple(main.shape) != expected:
        raise CheckpointError(f"{where}: quantized weight of shape {list(main.shape)}, the config implies "
                              f"{list(expected)} for a [{', '.join(map(str, shape))}] weight")
    # copy=True: a CPU tensor from safe_open may share the file's mapping; own it, as float weights are owned
    qweight.load_parts({name: t.to(device, copy=True) for name, t in parts.items()}, fmt)


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
    widened to what any new file would get). Only a folder that is new, empty or a checkpoint / adapter written
    before is replaced (`check_replaceable`)."""
    check_replaceable(folder)
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


# ---- the vision tower's tensors (model/vision.py builds the tower and asks for them; text-only use never does)

CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def vision_candidate_names(ours: str) -> list[str]:
    """Our `VisionModel` name (`vision_tower.*`, `embed_vision.*`) -> the names a checkpoint may store it under."""
    return ["model.encoder." + ours, "encoder." + ours]


def read_vision_tensors(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Copy the vision tensors stored in checkpoint `folder` into `targets` ({our `VisionModel` name: tensor},
    as letterpress.model.vision.load_vision_model asks), checking each one's presence, shape, dtype and values."""
    files = weight_files(folder)
    plan: dict[Path, list[tuple[str, str]]] = {}
    for ours in targets:
        stored = next((n for n in vision_candidate_names(ours) if n in files), None)
        if stored is None:
            raise CheckpointError(f"{folder}: vision tensor {vision_candidate_names(ours)[0]} is missing from the "
                                  "checkpoint (a text-only model with a vision_config?)")
        plan.setdefault(files[stored], []).append((ours, stored))
    for path, items in sorted(plan.items()):
        with _open(path) as f:
            for ours, stored in items:
                try:
                    tensor = f.get_tensor(stored)
                except Exception as e:
                    raise CheckpointError(f"{path.name}: cannot read {stored}, is the file truncated? ({e})") from None
                if tuple(tensor.shape) != tuple(targets[ours].shape):
                    raise CheckpointError(f"{path.name}: {stored} has shape {list(tensor.shape)}, "
                                          f"the vision config implies {list(targets[ours].shape)}")
                check_stored_dtype(path, stored, f.get_slice(stored).get_dtype(), targets[ours])
                targets[ours].data.copy_(tensor)
                # clip bounds are ±inf where a linear is not clipped (transformers' init): only weights must be finite
                if not ours.endswith(CLIP_BOUNDS) and count_non_finite(targets[ours].data):
                    raise non_finite_error(folder, [(path.name, stored, count_non_finite(targets[ours].data),
                                                     tensor.numel(), None)])
