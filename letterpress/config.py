"""Parse a DiffusionGemma checkpoint's `config.json` and `generation_config.json` into dataclasses.

Only plain data lives here; nothing in this module knows about torch modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeConfig:
    """RoPE for one layer type. `proportional` rotates only the first `partial_rotary_factor` of the frequencies
    (the rest are identity) but, unlike classic partial RoPE, keeps the frequency denominator at the full head dim."""

    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    """The per-layer shape: full-attention layers use a larger head and fewer KV heads than sliding ones."""

    layer_type: str
    head_dim: int
    num_kv_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    # The window the attention actually uses. For `use_bidirectional_attention == "all"` this is already the
    # halved value (stored // 2 + 1), as the reference converts it on load; `stored_sliding_window` keeps the
    # number written in config.json so that we can write it back unchanged.
    sliding_window: int = 512
    stored_sliding_window: int = 512
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: str | None = None
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    layers: list[LayerSpec] = field(default_factory=list)
    rope: dict[str, RopeConfig] = field(default_factory=dict)

    @property
    def layer_types(self) -> list[str]:
        return [spec.layer_type for spec in self.layers]

    @property
    def encoder_is_causal(self) -> bool:
        """The encoder is causal unless the config asks for bidirectional attention over all tokens.
        ("vision" makes only image tokens bidirectional; we support text only, so it is causal here.)"""
        return self.use_bidirectional_attention != "all"


@dataclass
class ModelConfig:
    text: TextConfig
    canvas_length: int = 256
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None
    has_vision: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class GenerationDefaults:
    """Sampler defaults; the reference's global defaults, overridden by `generation_config.json` when present."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0


def _default_layer_types(num_layers: int) -> list[str]:
    # 5 sliding : 1 full, as the reference does when `layer_types` is absent.
    return [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]


def _as_id_list(value: Any, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_configs(raw: dict[str, Any]) -> dict[str, RopeConfig]:
    params = raw.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    out = {}
    for layer_type, p in params.items():
        if p is None:
            continue
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            raise ConfigError(f"rope_type {rope_type!r} for {layer_type} is not supported (default, proportional)")
        out[layer_type] = RopeConfig(
            rope_type=rope_type,
            theta=float(p.get("rope_theta", 10_000.0)),
            partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
            factor=float(p.get("factor", 1.0)),
        )
    return out


def _layer_specs(raw: dict[str, Any], layer_types: list[str], head_dim: int, kv_heads: int) -> list[LayerSpec]:
    """Per-layer head dim and KV heads. transformers 5.23 writes `per_layer_config` ({"2": {"head_dim": ..}});
    other writers give `global_head_dim` / `num_global_key_value_heads` for the full-attention layers."""
    per_layer = raw.get("per_layer_config")
    if per_layer is None:
        override: dict[str, int] = {"head_dim": int(raw.get("global_head_dim", 512))}
        if raw.get("num_global_key_value_heads") is not None:
            override["num_key_value_heads"] = int(raw["num_global_key_value_heads"])
        per_layer = {str(i): override for i, t in enumerate(layer_types) if t == FULL}
    specs = []
    for i, layer_type in enumerate(layer_types):
        o = per_layer.get(str(i), per_layer.get(i, {})) or {}
        specs.append(
            LayerSpec(
                layer_type=layer_type,
                head_dim=int(o.get("head_dim", head_dim)),
                num_kv_heads=int(o.get("num_key_value_heads", kv_heads)),
            )
        )
    return specs


def text_config_from_dict(raw: dict[str, Any]) -> TextConfig:
    known = {f.name for f in fields(TextConfig)}
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("eos_token_id", "layers", "rope")}
    cfg = TextConfig(**kwargs)
    cfg.eos_token_id = _as_id_list(raw.get("eos_token_id"), [1])
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    if cfg.final_logit_softcapping is None and "final_logit_softcapping" not in raw:
        cfg.final_logit_softcapping = 30.0
    for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if raw.get(name) is None:
            raise ConfigError(f"text_config.{name} is missing: letterpress supports the MoE DiffusionGemma only")
    if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation {cfg.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    layer_types = list(raw.get("layer_types") or _default_layer_types(cfg.num_hidden_layers))
    if len(layer_types) != cfg.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {cfg.num_hidden_layers}")
    unknown = set(layer_types) - {SLIDING, FULL}
    if unknown:
        raise ConfigError(f"unknown layer types {sorted(unknown)}")
    layer_types[-1] = FULL  # the reference forces the last layer to full attention
    cfg.layers = _layer_specs(raw, layer_types, cfg.head_dim, cfg.num_key_value_heads)
    for i, spec in enumerate(cfg.layers):
        if cfg.num_attention_heads % spec.num_kv_heads:
            raise ConfigError(f"layer {i}: num_attention_heads is not a multiple of its {spec.num_kv_heads} KV heads")
    cfg.rope = _rope_configs(raw)
    missing = set(layer_types) - set(cfg.rope)
    if missing:
        raise ConfigError(f"rope_parameters has no entry for {sorted(missing)}")

    cfg.stored_sliding_window = int(raw.get("sliding_window", 512))
    cfg.sliding_window = cfg.stored_sliding_window
    if cfg.use_bidirectional_attention == "all":
        # The reference stores the symmetric window and halves it on load (an exclusive bound).
        cfg.sliding_window = cfg.stored_sliding_window // 2 + 1
    elif cfg.use_bidirectional_attention not in (None, "vision"):
        raise ConfigError(f"use_bidirectional_attention must be null, 'vision' or 'all', got {cfg.use_bidirectional_attention!r}")
    return cfg


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type == "diffusion_gemma":
        text_raw = raw.get("text_config")
        if not isinstance(text_raw, dict):
            raise ConfigError("config.json has model_type 'diffusion_gemma' but no text_config")
    elif model_type == "diffusion_gemma_text":
        text_raw = raw
    else:
        raise ConfigError(f"config.json has model_type {model_type!r}; letterpress runs 'diffusion_gemma' checkpoints")
    return ModelConfig(
        text=text_config_from_dict(text_raw),
        canvas_length=int(raw.get("canvas_length") or 256),
        boi_token_id=raw.get("boi_token_id"),
        eoi_token_id=raw.get("eoi_token_id"),
        image_token_id=raw.get("image_token_id"),
        has_vision=raw.get("vision_config") is not None,
        raw=raw,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is this a DiffusionGemma checkpoint folder?")
    return model_config_from_dict(_read_json(path))


def load_generation_defaults(folder: str | Path, model: ModelConfig) -> GenerationDefaults:
    """Reference global defaults, overridden by any non-null value in generation_config.json."""
    gen = GenerationDefaults(eos_token_ids=list(model.text.eos_token_id), pad_token_id=model.text.pad_token_id)
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return gen
    raw = _read_json(path)
    sampler = raw.get("sampler_config")
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        gen.entropy_bound = float(sampler["entropy_bound"])
    for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold"):
        if raw.get(name) is not None:
            setattr(gen, name, int(raw[name]))
    for name in ("t_min", "t_max", "confidence_threshold"):
        if raw.get(name) is not None:
            setattr(gen, name, float(raw[name]))
    if raw.get("eos_token_id") is not None:
        gen.eos_token_ids = _as_id_list(raw["eos_token_id"], gen.eos_token_ids)
    if raw.get("pad_token_id") is not None:
        gen.pad_token_id = int(raw["pad_token_id"])
    return gen


# ---- vision ----------------------------------------------------------------------------------------------

# The image resolution tiers: the most soft tokens one image may become (Gemma 4's `max_soft_tokens`).
IMAGE_TIERS = (70, 140, 280, 560, 1120)
VIDEO_TIER = 70  # every video frame is processed at the lowest tier, as Gemma 4's video processor does


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (`vision_config`, model_type `gemma4_vision`) and `embed_vision`.

    Defaults are transformers' `Gemma4VisionConfig` class defaults, used for keys a config.json omits (the
    released checkpoint writes every key; its values differ from these: hidden 1152, 27 layers, ...)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0  # axial 2-D RoPE
    text_hidden_size: int = 2816  # the width `embed_vision` projects to (the text model's hidden size)
    default_soft_tokens: int = 280  # the tier an image gets when a request names none

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


def _vision_rope_theta(raw: dict[str, Any]) -> float:
    """transformers reads `rope_parameters` (or legacy `rope_scaling`), then a bare `rope_theta`; a type
    "default" means "axial" for this tower, and every other type is refused."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("vision_config.rope_parameters must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ConfigError(f"vision_config rope_type {rope_type!r} is not supported (the vision tower uses axial RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 100.0)))


def vision_config_of(model: ModelConfig) -> VisionConfig | None:
    """The vision tower's config, or None for a text-only checkpoint: no `vision_config`, or a tower with no
    layers (the placeholder letterpress writes so that transformers loads a text-only model)."""
    raw = model.raw.get("vision_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("config.json: vision_config must be an object")
    if int(raw.get("num_hidden_layers", 16)) == 0:
        return None
    known = {f.name for f in fields(VisionConfig)} - {"rope_theta", "text_hidden_size", "default_soft_tokens"}
    kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
    default = model.raw.get("vision_soft_tokens_per_image") or raw.get("default_output_length") or 280
    cfg = VisionConfig(**kwargs, rope_theta=_vision_rope_theta(raw), text_hidden_size=model.text.hidden_size,
                       default_soft_tokens=int(default))
    if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"vision_config.hidden_activation {cfg.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError("vision_config.num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.head_dim % 4:
        raise ConfigError(f"vision_config.head_dim {cfg.head_dim} must be a multiple of 4 (2-D RoPE rotates two halves)")
    if cfg.default_soft_tokens not in IMAGE_TIERS:
        raise ConfigError(f"vision_soft_tokens_per_image {cfg.default_soft_tokens} is not a tier {IMAGE_TIERS}")
    return cfg
