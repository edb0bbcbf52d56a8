"""Checkpoints other tools write (issue 12, item 11), saved by transformers 5.23 itself: zero-padded
`per_layer_config` keys at 10+ layers, EOS ids from config.json when there is no generation_config.json, the
config's `dtype` under dtype="auto", untied embeddings refused. Plus the Hub error when offline mode is off."""

from __future__ import annotations

import json

import pytest
import torch

from letterpress.checkpoint import resolve
from letterpress.config import FULL, SLIDING, load_generation_defaults, load_model_config
from letterpress.errors import CheckpointError, ConfigError
from letterpress.model import load_model
from letterpress.quant import GEMMA4_26B_A4B_TEXT

from .reference import BASE_TEXT, TINY_VISION, build_reference

transformers = pytest.importorskip("transformers")

# transformers' default 5:1 pattern: layers 5 and 11 are full attention
TWELVE = dict(num_hidden_layers=12, layer_types=None)


@pytest.fixture(scope="module")
def twelve_layers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twelve")
    reference = build_reference(folder, canvas_length=8, weight_std=0.05, embed_std=0.5, **TWELVE)
    return folder, reference


def our_parse_matches_transformers(folder) -> None:
    """Every layer's type, head dim and KV heads as transformers' own config object has them."""
    ref = transformers.DiffusionGemmaConfig.from_pretrained(folder).text_config
    ours = load_model_config(folder).text
    assert len(ours.layers) == ref.num_hidden_layers
    for i, spec in enumerate(ours.layers):
        layer = ref.per_layer_config[i]
        assert (spec.layer_type, spec.head_dim, spec.num_kv_heads) == (
            ref.layer_types[i], layer.head_dim, layer.num_key_value_heads), f"layer {i}"


def test_twelve_layers_zero_padded_keys_load_and_match_reference(twelve_layers):
    folder, reference = twelve_layers
    stored = json.loads((folder / "config.json").read_text())["text_config"]["per_layer_config"]
    assert sorted(stored) == ["05", "11"]  # what transformers writes at 10+ layers
    our_parse_matches_transformers(folder)
    text = load_model_config(folder).text
    assert [i for i, s in enumerate(text.layers) if s.layer_type == FULL] == [5, 11]
    assert (text.layers[5].head_dim, text.layers[5].num_kv_heads) == (BASE_TEXT["global_head_dim"], 1)
    assert (text.layers[4].head_dim, text.layers[4].num_kv_heads) == (BASE_TEXT["head_dim"], 2)

    from transformers.cache_utils import DynamicCache

    model = load_model(folder)
    prompt, canvas = torch.arange(3, 15)[None], torch.arange(20, 28)[None]
    cache = model.new_cache(1, 32)
    model.encode(prompt, cache)
    ours = model.denoise(canvas, cache)
    ref_cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
    with torch.no_grad():
        reference.model.encoder(input_ids=prompt, past_key_values=ref_cache)
        ref = reference(decoder_input_ids=canvas, past_key_values=ref_cache).logits
    # float32 through 12 layers: differences of a few 1e-4 (logits span about +-30); a misparsed layer could
    # not load at all (wrong shapes), a wrong head dim would give differences of order 1
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("resaves", [1, 2])
def test_released_30_layer_config_resaved(tmp_path, resaves):
    """The released model's shape (config only, no weights), saved by transformers once and re-saved as a
    fine-tune would be: our per-layer parse equals transformers' for all 30 layers, and our module shapes on
    the meta device equal transformers' for every text weight."""
    config = transformers.DiffusionGemmaConfig(text_config=GEMMA4_26B_A4B_TEXT, vision_config=TINY_VISION)
    config.save_pretrained(tmp_path)
    for _ in range(resaves - 1):
        transformers.DiffusionGemmaConfig.from_pretrained(tmp_path).save_pretrained(tmp_path)
    keys = json.loads((tmp_path / "config.json").read_text())["text_config"]["per_layer_config"]
    assert sorted(keys) == ["05", "11", "17", "23", "29"]
    our_parse_matches_transformers(tmp_path)
    text = load_model_config(tmp_path).text
    assert text.layer_types == ([SLIDING] * 5 + [FULL]) * 5
    assert {(s.head_dim, s.num_kv_heads) for s in text.layers if s.layer_type == FULL} == {(512, 2)}
    assert {(s.head_dim, s.num_kv_heads) for s in text.layers if s.layer_type == SLIDING} == {(256, 8)}

    from letterpress.checkpoint import candidate_names
    from letterpress.model import DiffusionGemma

    with torch.device("meta"):
        ref = transformers.DiffusionGemmaForBlockDiffusion(
            transformers.DiffusionGemmaConfig.from_pretrained(tmp_path))
        ours = DiffusionGemma(load_model_config(tmp_path))
    ref_shapes = {n: tuple(t.shape) for n, t in [*ref.named_parameters(), *ref.named_buffers()]}
    checked = 0
    for name, tensor in [*ours.named_parameters(), *ours.named_buffers()]:
        stored = next((n for n in candidate_names(name) if n in ref_shapes), None)
        if stored is None:
            continue  # RoPE frequencies: not weights
        assert tuple(tensor.shape) == ref_shapes[stored], name
        checked += 1
    assert checked > 30 * 10


def test_eos_from_config_without_generation_config(tmp_path):
    """No generation_config.json: the top-level eos_token_id wins over text_config's (as transformers'
    GenerationConfig.from_model_config does), then text_config's is used."""
    config = transformers.DiffusionGemmaConfig(text_config=BASE_TEXT, vision_config=TINY_VISION,
                                               eos_token_id=[1, 106, 50])
    config.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    defaults = load_generation_defaults(tmp_path, load_model_config(tmp_path))
    assert defaults.eos_token_ids == [1, 106, 50]
    assert defaults.eos_token_ids == transformers.GenerationConfig.from_model_config(config).eos_token_id

    text_only = transformers.DiffusionGemmaConfig(text_config={**BASE_TEXT, "eos_token_id": [1, 7]},
                                                  vision_config=TINY_VISION)
    text_only.save_pretrained(tmp_path)
    defaults = load_generation_defaults(tmp_path, load_model_config(tmp_path))
    assert defaults.eos_token_ids == [1, 7] == transformers.GenerationConfig.from_model_config(text_only).eos_token_id


def test_dtype_auto_follows_the_config(tmp_path):
    reference = build_reference(tmp_path / "f32", canvas_length=8)
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16", dtype="auto").embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16").embed_tokens.weight.dtype == torch.float32  # the default is unchanged
    assert load_model(tmp_path / "f32", dtype="auto").embed_tokens.weight.dtype == torch.float32

    # no dtype in config.json: the dtype the tensors are stored in
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    del config["dtype"]
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path / "bf16", dtype="auto").embed_tokens.weight.dtype == torch.bfloat16

    config["dtype"] = "int8"
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dtype 'int8'"):
        load_model(tmp_path / "bf16", dtype="auto")


def test_llm_accepts_dtype_auto(tmp_path):
    from letterpress import LLM
    from letterpress.embedded import ASSETS

    llm = LLM(ASSETS / "tiny_code", dtype="auto")  # shipped in bfloat16, without a dtype in config.json
    assert llm.model.embed_tokens.weight.dtype == torch.bfloat16


def test_untied_embeddings_refused(tmp_path):
    config = transformers.DiffusionGemmaConfig(text_config=BASE_TEXT, vision_config=TINY_VISION,
                                               tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tie_word_embeddings is false"):
        load_model_config(tmp_path)


def test_unreachable_hub_is_not_called_offline(monkeypatch, tmp_path):
    """Offline mode off and the Hub unreachable: the message says so (it used to blame offline mode)."""
    from huggingface_hub import constants

    monkeypatch.delenv("LETTERPRESS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as error:
        resolve("nobody-letterpress/not-a-model", offline=False)
    assert "could not reach the Hub" in str(error.value) and "offline mode is on" not in str(error.value)
    with pytest.raises(CheckpointError, match="offline mode is on"):
        resolve("nobody-letterpress/not-a-model", offline=True)
