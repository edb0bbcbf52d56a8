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
