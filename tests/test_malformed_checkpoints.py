"""Malformed checkpoint folders (issue 12, item 6): every one is refused with a one-line error that names the
file and the field or tensor, from the library and from `letterpress generate <folder> "x"` (exit 2), never
with a traceback or a silently wrong model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from letterpress.checkpoint import count_non_finite
from letterpress.cli import main
from letterpress.config import load_generation_defaults, load_model_config
from letterpress.embedded import ASSETS
from letterpress.errors import LetterpressError
from letterpress.model import load_model

TINY = ASSETS / "tiny_code"
A_TENSOR = "model.decoder.layers.0.self_attn.q_proj.weight"


def edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        change(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    return apply


def edit_text(**fields) -> Callable[[Path], None]:
    return edit_config(lambda raw: raw["text_config"].update(fields))


def edit_generation(**fields) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        raw = json.loads((folder / "generation_config.json").read_text())
        raw.update(fields)
        (folder / "generation_config.json").write_text(json.dumps(raw))
    return apply


def edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        change(state)
        with_weights(folder, state)
    return apply


def sharded_index(weight_map) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return apply


def not_utf8(folder: Path) -> None:
    data = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(data.replace(b'"diffusion_gemma"', b'"diffusion_gemma\xff"', 1))


def all_nan(state: dict) -> None:
    for tensor in state.values():
        tensor.fill_(float("nan"))


def as_int16(state: dict) -> None:
    state[A_TENSOR] = (state[A_TENSOR] * 1000).to(torch.int16)


def nan_literal(folder: Path) -> None:  # Python's json accepts the non-standard NaN literal
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"hidden_size": 192', '"hidden_size": 192, "rms_norm_eps": NaN'))


# name -> (how to break the shipped tiny_code folder, what the one-line error must contain)
MALFORMED: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "config-not-utf8": (not_utf8, ["config.json", "not UTF-8", "0xff"]),
    "kv-heads-zero": (edit_text(num_key_value_heads=0), ["config.json", "text_config.num_key_value_heads", ">= 1"]),
    "hidden-size-string": (edit_text(hidden_size="192"), ["config.json", "text_config.hidden_size", "'192'"]),
    "canvas-length-abc": (edit_config(lambda r: r.update(canvas_length="abc")), ["config.json", "canvas_length"]),
    "rope-values-not-objects": (edit_text(rope_parameters={"sliding_attention": 10000.0, "full_attention": "x"}),
                                ["config.json", "text_config.rope_parameters.sliding_attention", "object"]),
    "max-new-tokens-abc": (edit_generation(max_new_tokens="abc"), ["generation_config.json", "max_new_tokens"]),
    "all-nan-weights": (edit_weights(all_nan), ["model.safetensors", "NaN or infinite", "more tensors"]),
    "int16-tensor": (edit_weights(as_int16), ["model.safetensors", A_TENSOR, "I16"]),
    # beyond the list: other types, ranges and cross-field rules
    "nan-literal": (nan_literal, ["config.json", "text_config.rms_norm_eps", "nan"]),
    "bool-as-int": (edit_text(num_hidden_layers=True), ["config.json", "text_config.num_hidden_layers"]),
    "negative-size": (edit_text(vocab_size=-5), ["config.json", "text_config.vocab_size"]),
    "odd-head-dim": (edit_text(head_dim=47), ["config.json", "text_config.head_dim", "even"]),
    "eos-not-ids": (edit_text(eos_token_id=["a"]), ["config.json", "text_config.eos_token_id"]),
    "top-k-above-experts": (edit_text(top_k_experts=9), ["config.json", "text_config.top_k_experts"]),
    "layer-types-not-list": (edit_text(layer_types="sliding_attention"), ["config.json", "text_config.layer_types"]),
    "per-layer-bad-key": (edit_text(per_layer_config={"x3": {"head_dim": 96}}), ["config.json", "per_layer_config.x3"]),
    "per-layer-out-of-range": (edit_text(per_layer_config={"7": {}}), ["config.json", "per_layer_config.7", "layer 7"]),
    "per-layer-string-heads": (edit_text(per_layer_config={"3": {"head_dim": "96"}}),
                               ["config.json", "per_layer_config.3.head_dim"]),
    "index-weight-map-list": (sharded_index(["model.safetensors"]), ["model.safetensors.index.json", "weight_map"]),
    "index-shard-outside-folder": (sharded_index({A_TENSOR: "../model.safetensors"}),
                                   ["model.safetensors.index.json", "weight_map"]),
    # checked against the file's headers before allocating: this must not try to allocate ~16 TB
    "hidden-size-huge": (edit_text(hidden_size=2_000_000_000), ["model.safetensors", "embed_tokens.weight has shape"]),
    "untied": (edit_config(lambda r: r.update(tie_word_embeddings=False)), ["config.json", "tie_word_embeddings"]),
    "pad-outside-vocab": (edit_text(pad_token_id=5000), ["config.json", "text_config.pad_token_id"]),
    "text-config-not-object": (edit_config(lambda r: r.update(text_config=[1])), ["config.json", "text_config"]),
    "t-max-below-t-min": (edit_generation(t_min=0.9, t_max=0.5), ["generation_config.json", "t_max"]),
    "entropy-bound-string": (edit_generation(sampler_config={"entropy_bound": "x"}),
                             ["generation_config.json", "sampler_config.entropy_bound"]),
}


def tiny_copy(folder: Path) -> Path:
    """The shipped tiny_code folder; the big files are symlinks (fast), replaced, never written through."""
    folder.mkdir()
    for item in TINY.iterdir():
        if item.suffix == ".json":
            (folder / item.name).write_bytes(item.read_bytes())
        else:
            (folder / item.name).symlink_to(item)
    return folder


def make_folder(root: Path, name: str) -> Path:
    folder = tiny_copy(root / name)
    MALFORMED[name][0](folder)
    return folder


def with_weights(folder: Path, state: dict) -> Path:
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("malformed")
    return {name: make_folder(root, name) for name in MALFORMED}


def load_all(folder: Path) -> None:
    model = load_model(folder)
    load_generation_defaults(folder, model.config)


@pytest.mark.parametrize("name", list(MALFORMED))
def test_cli_refuses_with_one_line_naming_file_and_field(malformed, name, capsys):
    code = main(["generate", str(malformed[name]), "x", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in MALFORMED[name][1]:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""


def test_cli_subprocess_exit_code_and_no_traceback(malformed):
    """The real entry point, once: exit status 2 and a single line on stderr."""
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "generate", str(malformed["hidden-size-string"]),
                          "x"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {malformed['hidden-size-string'] / 'config.json'}: text_config.hidden_size must be an integer "
        ">= 1, got '192'"]


@pytest.mark.parametrize("name", ["kv-heads-zero", "rope-values-not-objects", "config-not-utf8", "untied"])
def test_library_raises_config_error(malformed, name):
    with pytest.raises(LetterpressError, match="config.json"):
        load_model_config(malformed[name])


def test_int16_tensor_is_refused_not_cast(malformed):
    with pytest.raises(LetterpressError, match=rf"{A_TENSOR} is stored as I16"):
        load_model(malformed["int16-tensor"])


def test_non_finite_weights_reported_with_escape_hatch(malformed, tmp_path):
    folder = make_folder(tmp_path, "all-nan-weights")
    with pytest.raises(LetterpressError, match="NaN or infinite"):
        load_model(folder)
    model = load_model(folder, check_finite=False)  # on request, for inspection
    assert torch.isnan(model.embed_tokens.weight).all()


def test_one_nan_in_one_tensor_names_it(tmp_path):
    state = load_file(TINY / "model.safetensors")
    state[A_TENSOR][3, 5] = float("inf")
    folder = with_weights(tiny_copy(tmp_path / "ckpt"), state)
    with pytest.raises(LetterpressError, match=rf"{A_TENSOR} has 1 of \d+ values NaN or infinite: the checkpoint"):
        load_model(folder)


def test_overflow_when_casting_down_is_explained(tmp_path):
    state = load_file(TINY / "model.safetensors")
    state[A_TENSOR][0, 0] = 1e6  # fine in bfloat16 (as shipped) and float32, infinite in float16
    folder = with_weights(tiny_copy(tmp_path / "ckpt"), state)
    load_model(folder)  # float32: loads
    with pytest.raises(LetterpressError, match="overflowed when cast from BF16"):
        load_model(folder, dtype="float16")


def test_count_non_finite():
    x = torch.randn(100, 7)
    assert count_non_finite(x) == 0
    assert count_non_finite(torch.full((3,), 6e4, dtype=torch.float16)) == 0  # the sum overflows; the count is exact
    x[1, 2], x[5, 5], x[9, 0] = float("nan"), float("inf"), -float("inf")
    assert count_non_finite(x) == 3
    assert count_non_finite(x.to(torch.bfloat16)) == 3
    assert count_non_finite(torch.arange(5)) == 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("tensor", [A_TENSOR, "model.decoder.layers.1.experts.gate_up_proj"])
def test_non_finite_weights_refused_when_quantizing_while_loading(tmp_path, quantization, tensor):
    """Linear layers and packed experts (read one expert at a time) are quantized as they are read: the check
    sees their float values."""
    state = load_file(TINY / "model.safetensors")
    state[tensor].view(-1)[7] = float("nan")
    folder = with_weights(tiny_copy(tmp_path / "ckpt"), state)
    with pytest.raises(LetterpressError, match=rf"{tensor} has 1 of \d+ values NaN or infinite"):
        load_model(folder, quantization=quantization)
