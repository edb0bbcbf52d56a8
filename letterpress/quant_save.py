"""`letterpress quantize MODEL OUT --format int8|int4|fp8`: write a quantized checkpoint in the layout of
compressed-tensors (the library vLLM and llm-compressor use), which `load_model` reads back directly.

Tensor by tensor: each float tensor is read, quantized (packed experts one expert at a time) and only the
quantized form is kept, so writing needs about the quantized model plus one float tensor of memory. What is
quantized is what `--quantization` quantizes (letterpress.quant): the linear layers of the text stack and
the packed experts; the embedding, routers and norms are copied in their stored dtype, and so is every
tensor we do not use (the vision tower), so the output stays a complete checkpoint. Names follow
transformers' layout (`save_model`); config.json gains a `quantization_config`
(`quant_method: compressed-tensors`); tokenizer and generation files are copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import (INDEX_FILE, SINGLE_FILE, _ExpertSlices, _open, _trim_heap, atomic_folder, candidate_names,
                         check_replaceable, checkpoint_names, plan_weights, read_tensor, resolve, weight_files)
from .config import load_model_config
from .errors import CheckpointError
from .quant import check_format, ct_int4_group, ct_quantization_config, ct_quantize, quantized_tensor_names

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, offline: bool | None = None,
                        revision: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Quantize the float checkpoint `src` (folder or Hub id) into the folder `out`. Returns `out`."""
    from .model import DiffusionGemma

    fmt = check_format(fmt)
    if fmt is None:
        raise CheckpointError("letterpress quantize needs a format: int8, int4 or fp8")
    check_replaceable(Path(out))  # before the work, not only when writing
    folder = resolve(src, offline=offline, revision=revision)
    config = load_model_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("quantization_config"):
        raise CheckpointError(f"{folder.name} is already quantized "
                              f"({raw['quantization_config'].get('quant_method')}); quantize a float checkpoint")
    with torch.device("meta"):
        model = DiffusionGemma(config)
    files = weight_files(folder)
    plan = plan_weights(model, folder, files)
    to_quantize = set(quantized_tensor_names(model))
    shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    ours_stored = {c for ours in shapes for c in candidate_names(ours)}

    group = ct_int4_group([shapes[n][-1] for n in to_quantize]) if fmt == "int4" else None
    state: dict[str, torch.Tensor] = {}
    ignore = ["lm_head"]
    with _OpenFiles(files) as handle:
        for ours, stored in plan.items():
            name = stored.names.get("float")
            if name is None:
                raise CheckpointError(f"{folder.name}: {ours} is stored quantized already")
            f, path = handle(name)
            out_name = checkpoint_names(ours)[0]
            if ours not in to_quantize:
                state[out_name] = read_tensor(f, path, name, shapes[ours]).contiguous()
                if out_name.endswith("router.proj.weight"):
                    ignore.append(out_name[: -len(".weight")])
                continue
            shape = shapes[ours]
            scale_dtype = _stored_dtype(f, name)
            weight = (_ExpertSlices(f, path, name, shape, scale_dtype, "cpu") if len(shape) == 3
                      else read_tensor(f, path, name, shape))
            prefix = out_name[: -len(".weight")] if out_name.endswith(".weight") else out_name
            for local, tensor in ct_quantize(weight, fmt, scale_dtype, group or 0).items():
                state[f"{prefix}.{local}"] = tensor.contiguous()
            del weight
            _trim_heap()
        for name in files:  # what we do not use (the vision tower), copied as stored
            if name in ours_stored:
                continue
            f, path = handle(name)
            tensor = read_tensor(f, path, name)
            state[name] = tensor
            if name.endswith(".weight") and tensor.ndim == 2:
                ignore.append(name[: -len(".weight")])  # a linear layer a compressed-tensors loader must not touch

    raw["quantization_config"] = ct_quantization_config(fmt, group, sorted(ignore))
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_shards(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for extra in folder.iterdir():  # tokenizer, generation config, chat template, ...
            if extra.is_file() and extra.name not in ("config.json", INDEX_FILE) and extra.suffix != ".safetensors":
                shutil.copyfile(extra, tmp / extra.name)
    return out


def _stored_dtype(f, name: str) -> torch.dtype:
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    return dtypes.get(f.get_slice(name).get_dtype(), torch.float32)


class _OpenFiles:
    """Open each shard once, on first use: `handle(name) -> (safe_open handle, path)`."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.open = files, {}

    def __enter__(self):
        return self

    def __call__(self, name: str):
        path = self.files[name]
        if path not in self.open:
            ctx = _open(path)
            self.open[path] = (ctx, ctx.__enter__())
        return self.open[path][1], path

    def __exit__(self, *exc):
        for ctx, _ in self.open.values():
            ctx.__exit__(None, None, None)


def save_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """One model.safetensors, or shards of at most `max_shard_bytes` with an index (transformers' names)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
