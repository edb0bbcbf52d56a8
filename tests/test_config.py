"""config.json / generation_config.json parsing."""

from __future__ import annotations

import json

import pytest

from letterpress.config import FULL, SLIDING, load_generation_defaults, model_config_from_dict
from letterpress.errors import ConfigError

TEXT = {"model_type": "diffusion_gemma_text", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 16, "sliding_window": 1024}


def config(**text):
    return model_config_from_dict({"model_type": "diffusion_gemma", "text_config": {**TEXT, **text}, "canvas_length": 32})


def test_default_layer_pattern_and_global_heads():
    cfg = config(global_head_dim=16, num_global_key_value_heads=1).text
    # 5 sliding : 1 full, and the last layer is always full
    assert cfg.layer_types == [SLIDING] * 5 + [FULL, FULL]
    assert [(s.head_dim, s.num_kv_heads) for s in cfg.layers] == [(8, 2)] * 5 + [(16, 1)] * 2
    assert cfg.rope[FULL].rope_type == "proportional" and cfg.rope[FULL].partial_rotary_factor == 0.25
    assert cfg.rope[SLIDING].theta == 10_000.0 and cfg.rope[FULL].theta == 1_000_000.0
    assert cfg.final_logit_softcapping == 30.0


def test_per_layer_config_as_transformers_writes_it():
    cfg = config(layer_types=[SLIDING, FULL] * 3 + [SLIDING],
                 per_layer_config={"1": {"head_dim": 24, "num_key_value_heads": 1}}).text
    assert cfg.layer_types[-1] == FULL  # forced, as the reference does
    assert (cfg.layers[1].head_dim, cfg.layers[1].num_kv_heads) == (24, 1)
    assert (cfg.layers[3].head_dim, cfg.layers[3].num_kv_heads) == (8, 2)  # not listed: base shape


def test_has_vision_means_a_usable_tower():
    """True only where `vision_config_of` gives a tower: not for a text-only config, nor for the 0-layer
    placeholder tower letterpress writes so that transformers loads a text-only checkpoint."""
    from letterpress.checkpoint import PLACEHOLDER_VISION_CONFIG
    from letterpress.config import vision_config_of

    def with_vision(vision):
        raw = {"model_type": "diffusion_gemma", "text_config": TEXT, "canvas_length": 32}
        return model_config_from_dict(raw if vision is None else {**raw, "vision_config": vision})

    for vision, usable in [(None, False), (PLACEHOLDER_VISION_CONFIG, False), ({"num_hidden_layers": 0}, False),
                           ({"num_hidden_layers": 2}, True), ({}, True)]:  # absent: transformers' 16 layers
        cfg = with_vision(vision)
        assert cfg.has_vision is usable, vision
        assert (vision_config_of(cfg) is not None) is usable, vision


def test_bidirectional_all_halves_the_window():
    cfg = config(use_bidirectional_attention="all").text
    assert cfg.sliding_window == 513 and cfg.stored_sliding_window == 1024 and not cfg.encoder_is_causal
    vision = config(use_bidirectional_attention="vision").text
    assert vision.sliding_window == 1024 and vision.encoder_is_causal


@pytest.mark.parametrize("bad, message", [
    ({"num_experts": None}, "num_experts"),
    ({"layer_types": [SLIDING] * 3}, "layer_types has 3 entries"),
    ({"layer_types": ["chunked_attention"] * 7}, "layer_types must be a list of one of"),
    ({"use_bidirectional_attention": "some"}, "use_bidirectional_attention"),
    ({"rope_parameters": {FULL: {"rope_type": "yarn"}}}, "yarn"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
])
def test_bad_configs(bad, message):
    with pytest.raises(ConfigError, match=message):
        config(**bad)


def test_generation_defaults(tmp_path):
    model = config(eos_token_id=[1, 106])
    defaults = load_generation_defaults(tmp_path, model)
    assert (defaults.max_denoising_steps, defaults.entropy_bound, defaults.t_min, defaults.t_max) == (48, 0.1, 0.4, 0.8)
    assert (defaults.stability_threshold, defaults.confidence_threshold, defaults.max_new_tokens) == (1, 0.005, 256)
    assert defaults.eos_token_ids == [1, 106]
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [1, 106, 50], "pad_token_id": 0, "max_denoising_steps": 32, "t_max": 0.9,
        "sampler_config": {"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"}, "t_min": None}))
    defaults = load_generation_defaults(tmp_path, model)
    assert defaults.eos_token_ids == [1, 106, 50]
    assert (defaults.max_denoising_steps, defaults.entropy_bound, defaults.t_min, defaults.t_max) == (32, 0.2, 0.4, 0.9)


# ---------------------------------------------------------------------------------- field rules (issue 12)
from letterpress.config import (GENERATION_RULES, LAYER_RULES, ROPE_RULES, SAMPLER_RULES, TEXT_RULES,  # noqa: E402
                                TOP_RULES, Rule, load_model_config)


def wrong_type(rule: Rule):
    return [1] if rule.kind == "object" else {"not": "this"}


@pytest.mark.parametrize("name", list(TEXT_RULES))
def test_every_text_field_is_type_checked(name):
    with pytest.raises(ConfigError, match=rf"^config.json: text_config\.{name} must be "):
        config(**{name: wrong_type(TEXT_RULES[name])})


@pytest.mark.parametrize("name", list(TOP_RULES))
def test_every_top_level_field_is_type_checked(name):
    raw = {"model_type": "diffusion_gemma", "text_config": TEXT, name: wrong_type(TOP_RULES[name])}
    with pytest.raises(ConfigError, match=rf"^config.json: {name} must be "):
        model_config_from_dict(raw)


@pytest.mark.parametrize("name", list(ROPE_RULES))
def test_every_rope_field_is_type_checked(name):
    rope = {SLIDING: {"rope_type": "default"}, FULL: {"rope_type": "default", name: wrong_type(ROPE_RULES[name])}}
    with pytest.raises(ConfigError, match=rf"text_config\.rope_parameters\.full_attention\.{name} must be "):
        config(rope_parameters=rope)


@pytest.mark.parametrize("name", list(LAYER_RULES))
def test_every_per_layer_field_is_type_checked(name):
    with pytest.raises(ConfigError, match=rf"text_config\.per_layer_config\.6\.{name} must be "):
        config(per_layer_config={"6": {name: "8"}})


@pytest.mark.parametrize("name", [*GENERATION_RULES, *(f"sampler_config.{n}" for n in SAMPLER_RULES)])
def test_every_generation_field_is_type_checked(tmp_path, name):
    if name.startswith("sampler_config."):
        raw = {"sampler_config": {name.split(".")[1]: "x"}}
    else:
        raw = {name: wrong_type(GENERATION_RULES[name])}
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"generation_config.json: {name} must be "):
        load_generation_defaults(tmp_path, config())


@pytest.mark.parametrize("bad, message", [
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be a number > 0"),
    ({"sliding_window": 2**40}, "sliding_window must be an integer >= 1"),
    ({"eos_token_id": []}, "eos_token_id must be a token id"),
    ({"per_layer_config": {"2": {"sliding_window": 4}}}, "per-layer sliding_window is not supported"),
    ({"per_layer_config": {"6": {"num_key_value_heads": 3}}}, "layer 6: num_attention_heads"),
    ({"rope_parameters": {SLIDING: {}, FULL: {"partial_rotary_factor": 1.5}}}, "partial_rotary_factor must be"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is false"),
])
def test_ranges_and_cross_field_rules(bad, message):
    with pytest.raises(ConfigError, match=message):
        config(**bad)


def test_zero_padded_per_layer_keys_and_explicit_globals():
    """transformers writes "05" at 10+ layers; an override equal to the global value is harmless."""
    cfg = config(num_hidden_layers=12, layer_types=None, per_layer_config={
        "05": {"head_dim": 16, "num_key_value_heads": 1, "sliding_window": 1024}, "11": {"head_dim": 16}}).text
    assert [i for i, s in enumerate(cfg.layers) if not s.is_sliding] == [5, 11]
    assert (cfg.layers[5].head_dim, cfg.layers[5].num_kv_heads) == (16, 1)
    assert (cfg.layers[11].head_dim, cfg.layers[11].num_kv_heads) == (16, 2)
    with pytest.raises(ConfigError, match="layer 5 is listed twice"):
        config(num_hidden_layers=12, layer_types=None, per_layer_config={"05": {}, "5": {}})


def test_top_level_ids_and_dtype():
    raw = {"model_type": "diffusion_gemma", "text_config": {**TEXT, "eos_token_id": 1, "torch_dtype": "float16"},
           "eos_token_id": [1, 50, 60], "pad_token_id": 3}
    cfg = model_config_from_dict(raw)
    assert (cfg.eos_token_ids, cfg.pad_token_id, cfg.dtype) == ([1, 50, 60], 3, "float16")
    assert model_config_from_dict({**raw, "dtype": "bfloat16"}).dtype == "bfloat16"
    assert model_config_from_dict({**raw, "eos_token_id": None}).eos_token_ids == [1]


def test_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "diffusion_gemma", "x": "\xff"}')
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: not UTF-8 text \(byte 0xff"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": TEXT,
                                                      "canvas_length": "abc"}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: canvas_length must be an integer"):
        load_model_config(tmp_path)


@pytest.mark.parametrize("field, value", [("hidden_size", "32"), ("num_hidden_layers", -1), ("head_dim", 7),
                                          ("standardize", "yes"), ("rope_parameters", 5)])
def test_vision_config_fields_are_checked(field, value):
    from letterpress.config import vision_config_of

    raw = {"model_type": "diffusion_gemma", "text_config": TEXT, "vision_config": {field: value}}
    with pytest.raises(ConfigError, match=rf"^config.json: vision_config\.{field} must be "):
        vision_config_of(model_config_from_dict(raw))
    raw["vision_config"] = {"rope_parameters": {"rope_theta": "100"}}
    with pytest.raises(ConfigError, match=r"vision_config\.rope_parameters\.rope_theta must be "):
        vision_config_of(model_config_from_dict(raw))
