"""Quantizing while loading, `letterpress quantize`, and loading compressed-tensors checkpoints, including ones
quantized by the compressed-tensors library itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.model import load_model
from letterpress.cli import main as cli_main
from letterpress.errors import CheckpointError
from letterpress.quant import FORMATS, QuantExperts, QuantLinear, QuantWeight, model_bytes, quantize_model

from .fast_fixtures import assert_same_tensors, save_checkpoint

ct = pytest.importorskip("compressed_tensors")
pytest.importorskip("transformers")

from .ct_fixtures import (CT_TEXT, dequantizing_load, has_nvfp4, library_dequantized,  # noqa: E402
                          library_quantized)
from .reference import build_reference  # noqa: E402


def logits_of(model) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    model.encode(torch.arange(3, 19)[None], cache)
    first = model.denoise(torch.arange(20, 28)[None], cache)
    return torch.cat([first, model.denoise(torch.arange(20, 28)[None], cache, None, first / 0.8)])


def dequantizing(model):
    """The same model computing every quantized matmul as dequantize + F.linear (no kernels)."""
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.kernel = None
    return model


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("float"), qk_scale=0.3)


# ------------------------------------------------------------------------------------ quantize while loading
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(float_checkpoint, fmt, dtype):
    """Each tensor quantized as it is read (experts one slice at a time) gives exactly the model that
    loading in float and then quantizing gave, kernels (bf16 on CPU) included."""
    expected = quantize_model(load_model(float_checkpoint, dtype=dtype), fmt)
    got = load_model(float_checkpoint, dtype=dtype, quantization=fmt)
    assert got.quantization == fmt
    assert isinstance(got.layers[0].experts, QuantExperts) and isinstance(got.self_conditioning.up_proj, QuantLinear)
    assert_same_tensors(got, expected)
    assert [m.kernel for m in got.modules() if isinstance(m, QuantWeight)] == \
        [m.kernel for m in expected.modules() if isinstance(m, QuantWeight)]


# ------------------------------------------------------------------------------------ letterpress quantize
@pytest.fixture(scope="module")
def quantized_checkpoints(float_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    for fmt in FORMATS:
        assert cli_main(["quantize", str(float_checkpoint), str(out / fmt), "--format", fmt]) == 0
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_checkpoint_loads_without_float_weights(quantized_checkpoints, float_checkpoint, fmt, monkeypatch):
    folder = quantized_checkpoints / fmt
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert (folder / "generation_config.json").is_file()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert size < 0.45 * (float_checkpoint / "model.safetensors").stat().st_size  # float32 -> 1 byte or less

    import letterpress.quant as quant

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must load without quantizing anything")

    monkeypatch.setattr(quant, "quantize_parts", no_quantizing)
    loaded = load_model(folder)
    monkeypatch.undo()
    assert isinstance(loaded.layers[0].experts, QuantExperts)
    float_model = load_model(float_checkpoint)
    if fmt in ("int8", "fp8"):  # the same numbers as quantizing while loading, bit for bit
        assert_same_tensors(loaded, load_model(float_checkpoint, quantization=fmt))
    else:  # W4A16: symmetric groups of up to 128; every weight within half a step of the float one
        for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "self_conditioning.gate_proj"):
            qw = loaded.get_submodule(name).qweight
            w = float_model.get_submodule(name).weight
            step = qw.scale.repeat_interleave(qw.group, dim=-1)
            assert bool(((qw.dequantize(torch.float32) - w).abs() <= step / 2 + 1e-6).all()), name
        gate_up = loaded.layers[2].experts.gate_up
        err = gate_up.dequantize(torch.float32) - float_model.layers[2].experts.gate_up_proj
        assert bool((err.abs() <= gate_up.scale.repeat_interleave(gate_up.group, -1) / 2 + 1e-6).all())
    assert model_bytes(loaded) < 0.45 * model_bytes(float_model)


def test_transformers_reads_our_quantized_linear_layers(quantized_checkpoints):
    """The layout is compressed-tensors': transformers + compressed-tensors dequantize our int4 linear
    layers to exactly our dequantized weights (the packed experts are ours alone; see README)."""
    folder = quantized_checkpoints / "int4"
    ours = load_model(folder)
    theirs = dequantizing_load(folder).state_dict()
    for name in ("layers.0.self_attn.q_proj", "layers.1.self_attn.o_proj", "layers.3.mlp.up_proj",
                 "self_conditioning.down_proj"):
        expected = theirs[f"model.decoder.{name}.weight"].float()
        torch.testing.assert_close(ours.get_submodule(name).qweight.dequantize(torch.float32), expected,
                                   atol=1e-6, rtol=1e-6, msg=name)


def test_quantize_refuses_a_quantized_checkpoint(quantized_checkpoints, tmp_path, capsys):
    assert cli_main(["quantize", str(quantized_checkpoints / "int8"), str(tmp_path / "again"), "--format", "int4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("stored", FORMATS)
def test_a_quantized_checkpoint_asked_for_another_format_says_what_it_loads(quantized_checkpoints, stored, caplog):
    """Asking a stored-int8 checkpoint for int4 used to load int8 without a word: the stored layers load as
    stored (only layers left in float take the asked format), and a warning says so."""
    folder = quantized_checkpoints / stored
    with caplog.at_level("WARNING"):
        assert load_model(folder, quantization=stored).quantization == stored
    assert "stored quantized" not in caplog.text
    other = next(f for f in FORMATS if f != stored)
    with caplog.at_level("WARNING"):
        load_model(folder, quantization=other)
    assert f"is stored quantized ({stored}): those layers load as stored" in caplog.text


# --------------------------------------------------------------------- checkpoints quantized by the library
SCHEMES = ["FP8_DYNAMIC", "FP8", "W4A16", "W4A16_ASYM", "W8A16"] + (["NVFP4"] if has_nvfp4() else [])


@pytest.fixture(scope="module")
def library_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctbase")
    build_reference(folder, canvas_length=8, weight_std=0.05, embed_std=0.5, **CT_TEXT)
    return folder


@pytest.fixture(scope="module", params=SCHEMES)
def library_checkpoint(request, library_base, tmp_path_factory):
    scheme = request.param
    quantized = library_quantized(library_base, scheme, tmp_path_factory.mktemp(scheme))
    return scheme, quantized, library_dequantized(quantized, tmp_path_factory.mktemp(scheme + "-dequantized"))


# compressed-tensors 0.20 dequantizes NVFP4 in bfloat16 (scale / global_scale rounded to bf16: weights off by
# up to 2^-8 relative, enough to move logits of this random model by 0.5); we compute it in float32. Every
# other format agrees to float32 rounding.
WEIGHT_RTOL = {"NVFP4": 2**-8}


@torch.no_grad()
def test_library_quantized_checkpoint_loads_and_matches_its_dequantization(library_checkpoint):
    """A checkpoint quantized by compressed-tensors loads quantized (no float linear weights in memory), its
    weights dequantize to what compressed-tensors itself dequantizes them to, and its logits computed by
    dequantization (float32) are within 1e-4 of the float model holding those dequantized weights.
    compressed-tensors leaves the packed experts (3-D parameters, not nn.Linear) in float: so do we."""
    scheme, quantized, dequantized = library_checkpoint
    model = load_model(quantized)
    reference = load_model(dequantized)
    expected_fmt = {"FP8_DYNAMIC": "fp8", "FP8": "fp8", "W4A16": "int4", "W4A16_ASYM": "int4", "W8A16": "int8", "NVFP4": "nvfp4"}
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * 6 + 2 + 3  # q, k, o, gate, up, down per layer, v on the 2 sliding ones, 3 self-cond.
    for name in linears:
        qw = model.get_submodule(name).qweight
        assert qw.fmt == expected_fmt[scheme], name
        torch.testing.assert_close(qw.dequantize(torch.float32), reference.get_submodule(name).weight,
                                   atol=1e-6, rtol=WEIGHT_RTOL.get(scheme, 1e-6), msg=name)
    assert type(model.layers[0].experts).__name__ == "Experts"  # kept in the stored float
    assert torch.equal(model.layers[0].experts.gate_up_proj, reference.layers[0].experts.gate_up_proj)
    # The logits against our own float32 dequantization of the same weights: the library's differs from it by up
    # to 1e-6 (checked above), which this random model amplified past 1e-4 on an AMD EPYC CPU (W4A16_ASYM).
    for name in linears:
        reference.get_submodule(name).weight.copy_(model.get_submodule(name).qweight.dequantize(torch.float32))
    torch.testing.assert_close(logits_of(dequantizing(model)), logits_of(reference), atol=1e-4, rtol=0)


def test_library_quantized_checkpoint_generates_and_can_quantize_its_experts(library_checkpoint):
    """It runs in the engine; `quantization=` on top quantizes what the checkpoint left in float (the
    experts) and leaves the stored quantized layers as they are."""
    scheme, quantized, _ = library_checkpoint
    params = SamplingParams(max_new_tokens=16, seed=0, max_denoising_steps=4, ignore_eos=True)
    outs = LLM(quantized, max_num_seqs=2, max_model_len=64, impl="fast").generate([[3, 4, 5, 6], [7, 8]], params)
    assert [len(o.token_ids) for o in outs] == [16, 16]
    both = load_model(quantized, quantization="int8")
    assert isinstance(both.layers[1].experts, QuantExperts) and both.layers[1].experts.down.fmt == "int8"
    stored = load_model(quantized)
    assert torch.equal(both.layers[1].mlp.down_proj.qweight.dequantize(torch.float32),
                       stored.layers[1].mlp.down_proj.qweight.dequantize(torch.float32))


def test_unsupported_quantization_configs_are_clear_errors(library_base, tmp_path):
    import shutil

    folder = shutil.copytree(library_base, tmp_path / "gptq")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not supported.*compressed-tensors"):
        load_model(folder)
    raw["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "format": "float-quantized", "targets": ["Linear"], "weights": {"strategy": "block", "num_bits": 8}}}}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="block-wise"):
        load_model(folder)


# ---------------------------------------------------------------------------------------- loading memory
LOAD_MEMORY_SCRIPT = r"""
import sys
import torch
from letterpress.model import load_model
from letterpress.config import load_model_config
from letterpress.model import DiffusionGemma
from letterpress.profiling import peak_anon_rss
from letterpress.quant import model_bytes

# The first model built on the meta device costs ~70 MB of one-time torch imports (meta kernels), whatever
# the model's size: pay it before measuring.
with torch.device("meta"):
    DiffusionGemma(load_model_config(sys.argv[1]))

for folder, fmt in zip(sys.argv[1::2], sys.argv[2::2]):  # one load after another, each from its own baseline
    model, peak = peak_anon_rss(lambda: load_model(folder, quantization=None if fmt == "none" else fmt))
    print(peak, model_bytes(model))
    del model
"""

BIG_TEXT = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, global_head_dim=128, num_experts=8, top_k_experts=2,
                moe_intermediate_size=512, sliding_window=64)


def test_quantizing_while_loading_never_holds_the_float_model(tmp_path):
    """Peak anonymous memory while loading a 156 MB float32 checkpoint with int4: about the quantized model
    (38 MB: the 17 MB float embedding plus 5-bit weights: int4 with float32 scale and zero per 64) plus one
    float tensor in flight (the largest read at once: the embedding; experts are read one 1-2 MB slice at
    a time), far below the float model. A checkpoint written by `letterpress quantize` loads in about its
    own size plus that tensor. The same run after run: the loader gives freed heap pages back between
    expert slices (without that, 1 run in 8 peaked 20-40 MB higher, depending on the address-space layout)."""
    from letterpress.model import DiffusionGemma
    from letterpress.config import model_config_from_dict
    from letterpress.checkpoint import save_model

    raw = {"model_type": "diffusion_gemma", "canvas_length": 16, "text_config": BIG_TEXT}
    model = DiffusionGemma(model_config_from_dict(raw)).init_weights()
    float_bytes = model_bytes(model)
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values() if t.ndim < 3)
    save_model(model, tmp_path / "m", raw)
    del model
    assert cli_main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--format", "int4"]) == 0

    run = subprocess.run([sys.executable, "-c", LOAD_MEMORY_SCRIPT, str(tmp_path / "m"), "int4", str(tmp_path / "q"),
                          "none"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (peak_fly, quantized_bytes), (peak_stored, stored_bytes) = [[int(x) for x in line.split()]
                                                                for line in run.stdout.strip().splitlines()]
    assert quantized_bytes < 0.35 * float_bytes
    assert peak_fly < 1.25 * (quantized_bytes + largest), (peak_fly, quantized_bytes, largest)
    assert peak_fly < 0.5 * float_bytes
    assert peak_stored < 1.25 * (stored_bytes + largest), (peak_stored, stored_bytes)


def test_experts_stored_per_expert_are_a_clear_error(float_checkpoint, tmp_path):
    """llm-compressor's layout for models whose experts are linear modules (experts.{e}.gate_proj ...) is not
    one we load for this architecture (unverified for it): say so instead of "missing tensor"."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "per_expert"
    folder.mkdir()
    for extra in float_checkpoint.iterdir():
        if extra.suffix != ".safetensors":
            (folder / extra.name).write_bytes(extra.read_bytes())
    state = load_file(str(float_checkpoint / "model.safetensors"))
    for name in [n for n in state if n.endswith("experts.gate_up_proj")]:
        gate, up = state.pop(name).chunk(2, dim=1)
        prefix = name.rsplit(".", 1)[0]
        for e in range(gate.shape[0]):
            state[f"{prefix}.{e}.gate_proj.weight"] = gate[e].contiguous()
            state[f"{prefix}.{e}.up_proj.weight"] = up[e].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="one linear layer per expert"):
        load_model(folder)
