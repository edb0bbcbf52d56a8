"""Parse a DiffusionGemma checkpoint's `config.json` and `generation_config.json` into dataclasses.

Only plain data lives here; nothing in this module knows about torch modules.
"""

from __future__ import annotations

import json
import math
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
        ("vision" keeps text causal and makes each image's run of soft tokens bidirectional within itself:
        `DiffusionGemma.encode`'s `soft_token_mask`.)"""
        return self.use_bidirectional_attention != "all"


@dataclass
class ModelConfig:
    text: TextConfig
    canvas_length: int = 256
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None
    # Generation fallbacks when there is no generation_config.json: the top-level ids win over text_config's,
    # as transformers' GenerationConfig.from_model_config does.
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    dtype: str | None = None  # the checkpoint's own dtype (`dtype`, formerly `torch_dtype`), for dtype="auto"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    source: str = "config.json"  # the file `raw` came from, for error messages

    @property
    def has_vision(self) -> bool:
        """The checkpoint has a usable vision tower: a `vision_config` with layers. False for a text-only
        checkpoint and for the 0-layer placeholder tower letterpress writes so that transformers loads a
        text-only model. (`vision_config_of` also checks the tower's fields.)"""
        return has_tower_layers(self.raw.get("vision_config"))


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


# ------------------------------------------------------------------------------------------- field rules
MAX_INT = 2**31 - 1  # ids, sizes and counts end up in int32 index math somewhere


@dataclass(frozen=True)
class Rule:
    """What one JSON field may hold. `kind`: "int", "number" (int or float), "bool", "str", "ids" (an int or a
    list of ints), "strs" (a list of strings), "object". Bounds are inclusive (`lo`, `hi`) or exclusive
    (`above`); `null` says whether JSON null is allowed (it means "use the default")."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    even: bool = False
    null: bool = False

    def describe(self) -> str:
        what = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
                "ids": "a token id or a list of token ids", "strs": "a list of strings",
                "object": "a JSON object"}[self.kind]
        if self.even:
            what = "an even integer"
        if self.choices:
            what = ("a list of " if self.kind == "strs" else "") + "one of " + ", ".join(map(repr, self.choices))
        bounds = [f">= {self.lo:g}" if self.lo is not None else "", f"> {self.above:g}" if self.above is not None else "",
                  f"<= {self.hi:g}" if self.hi is not None and self.hi != MAX_INT else ""]
        bounds = [b for b in bounds if b]
        return what + (" " + " and ".join(bounds) if bounds else "") + (" (or null)" if self.null else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if self.kind in ("int", "ids"):
            items = value if self.kind == "ids" and isinstance(value, list) else [value]
            return bool(items) and all(_is_int(v) and self._in_range(v) for v in items)
        if self.kind == "number":
            return _is_number(value) and math.isfinite(value) and self._in_range(value)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices)
        if self.kind == "strs":
            return isinstance(value, list) and all(isinstance(v, str) and (not self.choices or v in self.choices)
                                                   for v in value)
        if self.kind == "object":
            return isinstance(value, dict)
        raise ValueError(f"unknown rule kind {self.kind!r}")

    def _in_range(self, value: float) -> bool:
        hi = self.hi if self.hi is not None else (MAX_INT if self.kind in ("int", "ids") else None)
        return ((self.lo is None or value >= self.lo) and (self.above is None or value > self.above)
                and (hi is None or value <= hi) and (not self.even or value % 2 == 0))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(raw: dict[str, Any], rules: dict[str, Rule], source: str, prefix: str = "") -> None:
    """Raise a one-line ConfigError naming `source` and the first field of `raw` its rule refuses. Fields
    without a rule are ignored (transformers writes many that do not concern us); absent fields get defaults."""
    for name, rule in rules.items():
        if name in raw and not rule.accepts(raw[name]):
            raise ConfigError(f"{source}: {prefix}{name} must be {rule.describe()}, got {_short(raw[name])}")


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


SIZE = Rule("int", lo=1)
HEAD_DIM = Rule("int", lo=2, even=True)  # RoPE rotates pairs of dimensions
TOKEN = Rule("int", lo=0, null=True)

TEXT_RULES: dict[str, Rule] = {
    "vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE, "num_hidden_layers": SIZE,
    "num_attention_heads": SIZE, "num_key_value_heads": SIZE, "head_dim": HEAD_DIM,
    "global_head_dim": HEAD_DIM, "num_global_key_value_heads": Rule("int", lo=1, null=True),
    "hidden_activation": Rule("str", choices=("gelu_pytorch_tanh", "gelu_tanh")),
    "max_position_embeddings": SIZE, "rms_norm_eps": Rule("number", above=0),
    "pad_token_id": TOKEN, "bos_token_id": TOKEN, "eos_token_id": Rule("ids", lo=0, null=True),
    "tie_word_embeddings": Rule("bool"), "attention_bias": Rule("bool"), "sliding_window": SIZE,
    "final_logit_softcapping": Rule("number", above=0, null=True),
    "use_bidirectional_attention": Rule("str", choices=("vision", "all"), null=True),
    "num_experts": Rule("int", lo=1, null=True), "top_k_experts": Rule("int", lo=1, null=True),
    "moe_intermediate_size": Rule("int", lo=1, null=True),
    "layer_types": Rule("strs", choices=(SLIDING, FULL), null=True),
    "rope_parameters": Rule("object", null=True), "per_layer_config": Rule("object", null=True),
    "dtype": Rule("str", null=True), "torch_dtype": Rule("str", null=True),
}
TOP_RULES: dict[str, Rule] = {
    "model_type": Rule("str", null=True), "text_config": Rule("object", null=True),
    "vision_config": Rule("object", null=True), "canvas_length": Rule("int", lo=1, null=True),
    "boi_token_id": TOKEN, "eoi_token_id": TOKEN, "image_token_id": TOKEN,
    "eos_token_id": Rule("ids", lo=0, null=True), "pad_token_id": TOKEN, "tie_word_embeddings": Rule("bool"),
    "dtype": Rule("str", null=True), "torch_dtype": Rule("str", null=True),
}
ROPE_RULES: dict[str, Rule] = {
    "rope_type": Rule("str", choices=("default", "proportional")), "rope_theta": Rule("number", above=0),
    "partial_rotary_factor": Rule("number", above=0, hi=1), "factor": Rule("number", above=0),
}
LAYER_RULES: dict[str, Rule] = {"head_dim": HEAD_DIM, "num_key_value_heads": SIZE}
GENERATION_RULES: dict[str, Rule] = {
    "max_new_tokens": Rule("int", lo=1, null=True), "max_denoising_steps": Rule("int", lo=1, null=True),
    "stability_threshold": Rule("int", lo=0, null=True), "t_min": Rule("number", lo=0, null=True),
    "t_max": Rule("number", above=0, null=True), "confidence_threshold": Rule("number", above=0, null=True),
    "eos_token_id": Rule("ids", lo=0, null=True), "pad_token_id": TOKEN, "sampler_config": Rule("object", null=True),
}
SAMPLER_RULES: dict[str, Rule] = {"entropy_bound": Rule("number", above=0, null=True)}


# ------------------------------------------------------------------------------------------- parsing
def _default_layer_types(num_layers: int) -> list[str]:
    # 5 sliding : 1 full, as the reference does when `layer_types` is absent.
    return [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]


def _as_id_list(value: Any, default: list[int]) -> list[int]:
    if value is None:
        return list(default)
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_configs(raw: dict[str, Any], source: str, prefix: str) -> dict[str, RopeConfig]:
    params = raw.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    out = {}
    for layer_type, p in params.items():
        if p is None:
            continue
        where = f"{prefix}rope_parameters.{layer_type}"
        if not isinstance(p, dict):
            raise _fail(source, f"{where} must be a JSON object (rope_type, rope_theta, ...), got {_short(p)}")
        check_fields(p, ROPE_RULES, source, where + ".")
        out[layer_type] = RopeConfig(
            rope_type=p.get("rope_type", "default"),
            theta=float(p.get("rope_theta", 10_000.0)),
            partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
            factor=float(p.get("factor", 1.0)),
        )
    return out


def _per_layer_overrides(raw: dict[str, Any], num_layers: int, source: str, prefix: str) -> dict[int, dict]:
    """`per_layer_config` by layer index. transformers writes the keys as strings, zero-padded to the width of
    the largest index ("05" in a 12-layer model), and reads them back with int(): so do we."""
    out: dict[int, dict] = {}
    for key, overrides in raw["per_layer_config"].items():
        where = f"{prefix}per_layer_config.{key}"
        try:
            index = int(key)
        except ValueError:
            raise _fail(source, f"{where}: keys must be layer indices, got {key!r}") from None
        if not 0 <= index < num_layers:
            raise _fail(source, f"{where}: layer {index} does not exist (num_hidden_layers is {num_layers})")
        if index in out:
            raise _fail(source, f"{where}: layer {index} is listed twice")
        if not isinstance(overrides, dict):
            raise _fail(source, f"{where} must be a JSON object, got {_short(overrides)}")
        check_fields(overrides, LAYER_RULES, source, where + ".")
        for name, value in overrides.items():
            # Other attributes may be listed only with the global value (transformers' explicit per-layer form).
            if name not in LAYER_RULES and raw.get(name, value) != value:
                raise _fail(source, f"{where}.{name}: per-layer {name} is not supported "
                                    f"(only {', '.join(LAYER_RULES)} may differ between layers)")
        out[index] = overrides
    return out


def _layer_specs(raw: dict[str, Any], layer_types: list[str], head_dim: int, kv_heads: int, source: str,
                 prefix: str) -> list[LayerSpec]:
    """Per-layer head dim and KV heads. transformers 5.23 writes `per_layer_config` ({"05": {"head_dim": ..}});
    other writers give `global_head_dim` / `num_global_key_value_heads` for the full-attention layers."""
    if raw.get("per_layer_config") is not None:
        per_layer = _per_layer_overrides(raw, len(layer_types), source, prefix)
    else:
        override: dict[str, int] = {"head_dim": raw.get("global_head_dim", 512)}
        if raw.get("num_global_key_value_heads") is not None:
            override["num_key_value_heads"] = raw["num_global_key_value_heads"]
        per_layer = {i: override for i, t in enumerate(layer_types) if t == FULL}
    return [LayerSpec(layer_type=layer_type,
                      head_dim=per_layer.get(i, {}).get("head_dim", head_dim),
                      num_kv_heads=per_layer.get(i, {}).get("num_key_value_heads", kv_heads))
            for i, layer_type in enumerate(layer_types)]


def text_config_from_dict(raw: dict[str, Any], source: str = "config.json", prefix: str = "") -> TextConfig:
    """`source` and `prefix` ("text_config.") only name the file and field in error messages."""
    check_fields(raw, TEXT_RULES, source, prefix)
    known = {f.name for f in fields(TextConfig)}
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("eos_token_id", "layers", "rope", "stored_sliding_window")}
    cfg = TextConfig(**kwargs)
    cfg.eos_token_id = _as_id_list(raw.get("eos_token_id"), [1])
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    if cfg.final_logit_softcapping is None and "final_logit_softcapping" not in raw:
        cfg.final_logit_softcapping = 30.0
    for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if raw.get(name) is None:
            raise _fail(source, f"{prefix}{name} is missing: letterpress supports the MoE DiffusionGemma only")
    if cfg.top_k_experts > cfg.num_experts:
        raise _fail(source, f"{prefix}top_k_experts ({cfg.top_k_experts}) is larger than num_experts ({cfg.num_experts})")
    if not cfg.tie_word_embeddings:
        raise _fail(source, f"{prefix}tie_word_embeddings is false: letterpress supports tied input and output "
                            "embeddings only (as the released model has)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise _fail(source, f"{prefix}num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({cfg.num_key_value_heads})")
    # The pad id is fed to the embedding, so it must be inside the vocabulary; an EOS id outside it would
    # merely never match (transformers only warns), so it is allowed.
    if cfg.pad_token_id >= cfg.vocab_size:
        raise _fail(source, f"{prefix}pad_token_id {cfg.pad_token_id} is outside the vocabulary "
                            f"(vocab_size {cfg.vocab_size})")

    layer_types = list(raw.get("layer_types") or _default_layer_types(cfg.num_hidden_layers))
    if len(layer_types) != cfg.num_hidden_layers:
        raise _fail(source, f"{prefix}layer_types has {len(layer_types)} entries but num_hidden_layers is "
                            f"{cfg.num_hidden_layers}")
    layer_types[-1] = FULL  # the reference forces the last layer to full attention
    cfg.layers = _layer_specs(raw, layer_types, cfg.head_dim, cfg.num_key_value_heads, source, prefix)
    for i, spec in enumerate(cfg.layers):
        if cfg.num_attention_heads % spec.num_kv_heads:
            raise _fail(source, f"{prefix}layer {i}: num_attention_heads ({cfg.num_attention_heads}) is not a "
                                f"multiple of its {spec.num_kv_heads} KV heads")
    cfg.rope = _rope_configs(raw, source, prefix)
    missing = set(layer_types) - set(cfg.rope)
    if missing:
        raise _fail(source, f"{prefix}rope_parameters has no entry for {sorted(missing)}")

    cfg.stored_sliding_window = raw.get("sliding_window", 512)
    cfg.sliding_window = cfg.stored_sliding_window
    if cfg.use_bidirectional_attention == "all":
        # The reference stores the symmetric window and halves it on load (an exclusive bound).
        cfg.sliding_window = cfg.stored_sliding_window // 2 + 1
    return cfg


def _stored_dtype_name(raw: dict[str, Any]) -> str | None:
    for section in (raw, raw.get("text_config") or {}):
        for name in ("dtype", "torch_dtype"):  # transformers 5 writes `dtype`, 4.x wrote `torch_dtype`
            if section.get(name) is not None:
                return section[name]
    return None


def model_config_from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """`source` names the file in error messages."""
    check_fields(raw, TOP_RULES, source)
    model_type = raw.get("model_type")
    if model_type == "diffusion_gemma":
        text_raw, prefix = raw.get("text_config"), "text_config."
        if not isinstance(text_raw, dict):
            raise _fail(source, "model_type is 'diffusion_gemma' but there is no text_config")
    elif model_type == "diffusion_gemma_text":
        text_raw, prefix = raw, ""
    else:
        raise _fail(source, f"model_type is {model_type!r}; letterpress runs 'diffusion_gemma' checkpoints")
    if raw.get("tie_word_embeddings") is False:
        # transformers: false at the top level unties everything, the encoder/decoder weights included
        raise _fail(source, "tie_word_embeddings is false: letterpress supports tied weights only "
                            "(as the released model has)")
    text = text_config_from_dict(text_raw, source, prefix)
    eos = _as_id_list(raw.get("eos_token_id"), text.eos_token_id)
    pad = raw["pad_token_id"] if raw.get("pad_token_id") is not None else text.pad_token_id
    if pad >= text.vocab_size:
        raise _fail(source, f"pad_token_id {pad} is outside the vocabulary (vocab_size {text.vocab_size})")
    return ModelConfig(
        text=text,
        canvas_length=raw.get("canvas_length") or 256,
        boi_token_id=raw.get("boi_token_id"),
        eoi_token_id=raw.get("eoi_token_id"),
        image_token_id=raw.get("image_token_id"),
        eos_token_ids=eos,
        pad_token_id=pad,
        dtype=_stored_dtype_name(raw),
        raw=raw,
        source=source,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is this a DiffusionGemma checkpoint folder?")
    return model_config_from_dict(_read_json(path), source=str(path))


def load_generation_defaults(folder: str | Path, model: ModelConfig) -> GenerationDefaults:
    """Reference global defaults, overridden by any non-null value in generation_config.json. Without that
    file, EOS and padding come from config.json (top level first, then text_config), as in transformers."""
    gen = GenerationDefaults(eos_token_ids=list(model.eos_token_ids), pad_token_id=model.pad_token_id)
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return gen
    raw = _read_json(path)
    source = str(path)
    check_fields(raw, GENERATION_RULES, source)
    sampler = raw.get("sampler_config") or {}
    check_fields(sampler, SAMPLER_RULES, source, "sampler_config.")
    if sampler.get("entropy_bound") is not None:
        gen.entropy_bound = float(sampler["entropy_bound"])
    for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold"):
        if raw.get(name) is not None:
            setattr(gen, name, raw[name])
    for name in ("t_min", "t_max", "confidence_threshold"):
        if raw.get(name) is not None:
            setattr(gen, name, float(raw[name]))
    if gen.t_max <= gen.t_min:
        raise _fail(source, f"t_max ({gen.t_max}) must be larger than t_min ({gen.t_min})")
    if raw.get("eos_token_id") is not None:
        gen.eos_token_ids = _as_id_list(raw["eos_token_id"], gen.eos_token_ids)
    if raw.get("pad_token_id") is not None:
        gen.pad_token_id = raw["pad_token_id"]
    if gen.pad_token_id >= model.text.vocab_size:
        raise _fail(source, f"pad_token_id {gen.pad_token_id} is outside the vocabulary "
                            f"(vocab_size {model.text.vocab_size})")
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


VISION_RULES: dict[str, Rule] = {
    "hidden_size": SIZE, "intermediate_size": SIZE, "num_hidden_layers": Rule("int", lo=0),
    "num_attention_heads": SIZE, "num_key_value_heads": SIZE, "head_dim": HEAD_DIM,
    "hidden_activation": Rule("str", null=True), "rms_norm_eps": Rule("number", above=0, null=True),
    "patch_size": SIZE, "pooling_kernel_size": SIZE, "position_embedding_size": SIZE,
    "use_clipped_linears": Rule("bool", null=True), "standardize": Rule("bool", null=True),
    "rope_theta": Rule("number", above=0, null=True), "rope_parameters": Rule("object", null=True),
    "rope_scaling": Rule("object", null=True), "default_output_length": Rule("int", lo=1, null=True),
}


def _vision_rope_theta(raw: dict[str, Any], source: str = "config.json") -> float:
    """transformers reads `rope_parameters` (or legacy `rope_scaling`), then a bare `rope_theta`; a type
    "default" means "axial" for this tower, and every other type is refused."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("vision_config.rope_parameters must be an object")
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    check_fields(params, {"rope_theta": Rule("number", above=0, null=True)}, source, f"vision_config.{key}.")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ConfigError(f"vision_config rope_type {rope_type!r} is not supported (the vision tower uses axial RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 100.0)))


def has_tower_layers(vision_config: Any) -> bool:
    """A `vision_config` object whose tower has layers (transformers' default is 16 when the field is absent)."""
    return isinstance(vision_config, dict) and vision_config.get("num_hidden_layers", 16) != 0


def vision_config_of(model: ModelConfig) -> VisionConfig | None:
    """The vision tower's config, or None for a text-only checkpoint: no `vision_config`, or a tower with no
    layers (the placeholder letterpress writes so that transformers loads a text-only model)."""
    raw = model.raw.get("vision_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(model.source, "vision_config must be an object")
    check_fields(raw, VISION_RULES, model.source, "vision_config.")
    check_fields(model.raw, {"vision_soft_tokens_per_image": Rule("int", lo=1, null=True)}, model.source)
    if not has_tower_layers(raw):
        return None
    known = {f.name for f in fields(VisionConfig)} - {"rope_theta", "text_hidden_size", "default_soft_tokens"}
    kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
    default = model.raw.get("vision_soft_tokens_per_image") or raw.get("default_output_length") or 280
    cfg = VisionConfig(**kwargs, rope_theta=_vision_rope_theta(raw, model.source), text_hidden_size=model.text.hidden_size,
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
