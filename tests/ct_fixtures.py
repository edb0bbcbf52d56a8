"""Checkpoints quantized by compressed-tensors itself (the library vLLM and llm-compressor use), built from a
tiny transformers DiffusionGemma with that library's own API, and their dequantization by transformers'
compressed-tensors integration, for tests/test_quant_load.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# Sizes that every preset accepts: the W4A16 presets group 128 inputs, so every linear input is a multiple of 128.
CT_TEXT = dict(hidden_size=128, intermediate_size=128, head_dim=32, global_head_dim=64, moe_intermediate_size=64)


def library_quantized(base: Path, scheme: str, out: Path) -> Path:
    """Quantize the transformers checkpoint `base` with compressed-tensors' preset `scheme` (W4A16, FP8_DYNAMIC,
    NVFP4, ...): apply_quantization_config on every Linear except the routers, the vision tower and the LM head;
    min/max scales from calculate_qparams (the weights' own range, as llm-compressor's minmax observer
    gives for weights); ModelCompressor.compress_model, save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    from loguru import logger
    from transformers import DiffusionGemmaForBlockDiffusion

    logger.disable("compressed_tensors")
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(base).eval()
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])},
                                ignore=["re:.*vision.*", "re:.*router.*", "lm_head", "re:.*embed.*"],
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme_args = getattr(module, "quantization_scheme", None)
            if scheme_args is None:
                continue
            args, w = scheme_args.weights, module.weight
            if args.strategy in ("group", "tensor_group"):
                grouped = w.unflatten(-1, (-1, args.group_size))
                low, high = grouped.amin(-1), grouped.amax(-1)
            elif args.strategy == "tensor":
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            else:  # channel
                low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            global_scale = None
            if args.strategy == "tensor_group":
                global_scale = generate_gparam(w.amin(), w.amax())
                module.weight_global_scale.copy_(global_scale)
            scale, zero_point = calculate_qparams(low, high, args, global_scale=global_scale)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out


def library_dequantized(quantized: Path, out: Path) -> Path:
    """Load a compressed-tensors checkpoint with transformers and let compressed-tensors dequantize it
    (`CompressedTensorsConfig(dequantize=True)`), then save the float model: the library's own reading of
    the same weights."""
    dequantizing_load(quantized).save_pretrained(out)
    return out


def dequantizing_load(folder: Path):
    """transformers' DiffusionGemma from a compressed-tensors checkpoint, dequantized on load as its docs show
    (`quantization_config=CompressedTensorsConfig(dequantize=True)`). transformers then warns that the passed
    loading attribute overrides the checkpoint's: what we ask for, so that one warning is silenced here."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You passed `quantization_config` or equivalent parameters to "
                                "`from_pretrained` but the model you're loading already has", UserWarning)
        return DiffusionGemmaForBlockDiffusion.from_pretrained(
            folder, quantization_config=CompressedTensorsConfig(dequantize=True))


def has_nvfp4() -> bool:
    from compressed_tensors.quantization import is_preset_scheme

    return is_preset_scheme("NVFP4")
