"""Weight-only quantization (letterpress.quant): round-trip error bounds, the kernels against dequantized
weights, and model logits within a stated tolerance of the float model."""

from __future__ import annotations

import copy

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.config import model_config_from_dict
from letterpress.errors import NotSupportedError
from letterpress.model.fast import apply_fast_path
from letterpress.quant import (FORMATS, GEMMA4_26B_A4B_TEXT, QuantExperts, QuantLinear, QuantWeight, dequantize_fp8, dequantize_int4,
                               dequantize_int8, dequantize_model, drift, model_bytes, pack_int4, projected_bytes, quantize_fp8,
                               quantize_int4, quantize_int8, quantize_model, unpack_int4)

from .fast_fixtures import random_model, save_checkpoint


def weights(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[..., 0, :] *= 20  # one row with much larger weights: scales must be per row / per group
    return w


def test_int8_round_trip_is_within_half_a_step():
    w = weights(3, 48, 128)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 48)
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[..., None] / 2 + 1e-7).all())
    assert bool((q.abs().amax(-1) == 127).all())  # each row uses its full range


def test_int4_round_trip_is_within_half_a_step_and_packs_two_per_byte():
    w = weights(2, 32, 256)
    packed, scale, zero = quantize_int4(w, group=64)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 32, 128)  # two 4-bit values per byte
    assert scale.shape == zero.shape == (2, 32, 4)
    err = (dequantize_int4(packed, scale, zero) - w).abs().reshape(2, 32, 4, 64)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())
    q = torch.randint(0, 16, (5, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 1 | 2 << 4


def test_fp8_round_trip_is_within_e4m3_precision():
    w = weights(48, 128)
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    err = (dequantize_fp8(q, scale) - w).abs()
    # 3 mantissa bits: relative error <= 2^-4 for normal numbers, absolute 2^-10 * scale below them
    assert bool((err <= w.abs() * 2**-4 + scale[:, None] * 2**-10 + 1e-9).all())


# Relative error of one quantized matmul against the float one (max |error| / max |output|), measured on
# Gaussian weights: int8 ~0.5%, fp8 (weights and activations in e4m3) ~3%, int4 (group 64) ~10%.
LINEAR_TOL = {"int8": 0.02, "fp8": 0.08, "int4": 0.2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_linear_matches_its_float_weight(fmt, dtype):
    """Each compute path (kernel on bf16 CPU, dequantize + linear otherwise) against the float weight and
    against its own dequantized weight."""
    w = weights(64, 128, seed=1).to(dtype)
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    qw = QuantWeight(w, fmt)
    if dtype == torch.bfloat16:
        assert qw.kernel is not None  # the CPU kernels take bf16 activations
    y = qw.linear(x)
    assert y.shape == (3, 7, 64) and y.dtype == dtype
    ref = x.float() @ w.float().t()
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < LINEAR_TOL[fmt]
    own = x.float() @ qw.dequantize(torch.float32).t()
    own_tol = 0.06 if fmt == "fp8" else (0.02 if dtype == torch.bfloat16 else 1e-5)  # fp8 also rounds x
    assert float((y.float() - own).abs().max() / own.abs().max()) < own_tol


def test_int4_kernel_layout_dequantizes_like_the_plain_layout():
    w = weights(48, 128, seed=3).to(torch.bfloat16)
    kernel = QuantWeight(w, "int4")
    assert kernel.kernel == "int4pack_cpu"
    plain = QuantWeight(w.float(), "int4")  # float32: plain layout, dequantize + linear
    assert plain.kernel is None
    torch.testing.assert_close(kernel.dequantize(torch.float32), plain.dequantize(torch.float32), atol=2e-2, rtol=2e-2)


def test_int4_group_falls_back_to_a_divisor():
    qw = QuantWeight(weights(16, 96), "int4")  # 96 is not a multiple of 64: groups of 32
    assert qw.group == 32
    assert torch.equal(qw.dequantize(), dequantize_int4(*quantize_int4(weights(16, 96), group=32)))


@pytest.mark.parametrize("impl", ["sorted", "grouped"])
@pytest.mark.parametrize("fmt", FORMATS)
@torch.no_grad()
def test_quantized_experts_match_dequantized_float_experts(fmt, impl):
    model = random_model()
    layer = model.layers[0]
    quant = QuantExperts(layer.experts, fmt)
    quant.impl = impl  # "grouped" on CPU: dequantized experts and torch._grouped_mm (fp8 included)
    reference = copy.deepcopy(layer.experts)  # float experts holding exactly the dequantized weights
    reference.gate_up_proj.copy_(quant.gate_up.dequantize(torch.float32))
    reference.down_proj.copy_(quant.down.dequantize(torch.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 64, generator=g)
    w, idx = layer.router(x)
    tol = 0.08 if fmt == "fp8" else 1e-5  # fp8 also quantizes the activations
    out, ref = quant(x, w, idx), reference(x, w, idx)
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize("fmt", FORMATS)
@torch.no_grad()
def test_grouped_quantized_experts_dequantize_a_few_experts_at_a_time(fmt):
    quant = QuantExperts(random_model().layers[0].experts, fmt)
    one_expert = quant.gate_up.shape[1] * quant.gate_up.shape[2] * 4
    assert torch.equal(quant.gate_up.dequantize_experts(torch.float32, chunk_bytes=3 * one_expert),
                       quant.gate_up.dequantize(torch.float32))


@torch.no_grad()
def test_int4_experts_dequantize_in_their_16_bit_dtype_as_a_gpu_does():
    w = torch.randn(5, 24, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qw = QuantWeight(w, "int4")  # 24 outputs: no CPU int4 kernel, so bf16 scales as on a GPU
    assert qw.kernel is None and qw.scale.dtype == torch.bfloat16
    fast = qw.dequantize_experts(torch.bfloat16, chunk_bytes=2 * 24 * 128 * 4)
    # exactly the 16-bit fused multiply-add q * scale + (zero - 8 * scale), not the float32 dequantization
    q = unpack_int4(qw.packed).view(5, 24, -1, qw.group).to(torch.bfloat16)
    formula = torch.addcmul((qw.zero - 8 * qw.scale)[..., None], q, qw.scale[..., None]).flatten(-2)
    assert torch.equal(fast, formula)
    exact = qw.dequantize(torch.float32)  # and within a few bf16 ulps of the float32 result
    assert float((fast.float() - exact).abs().max()) <= 4 * 2**-8 * float(exact.abs().max())


def reference_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, out_dtype=None, **_):
    """What `torch._scaled_grouped_mm` computes for a 2-D x 3-D call (CUDA only): torch's own checks on meta
    copies, then each expert's row block in float32."""
    torch.ops.aten._scaled_grouped_mm(a.to("meta"), b.to("meta"), scale_a.to("meta"), scale_b.to("meta"),
                                      offs=offs.to("meta"), out_dtype=out_dtype)
    out, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        rows = a[start:end].float() * scale_a[start:end, None]
        out.append(rows @ (b[expert].float() * scale_b[expert][None, :]))
        start = end
    return torch.cat(out).to(out_dtype)


@torch.no_grad()
def test_fp8_experts_grouped_by_scaled_grouped_mm_match_the_per_expert_path(monkeypatch):
    experts = random_model().layers[0].experts.to(torch.bfloat16)
    quant = QuantExperts(experts, "fp8")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=g).to(torch.bfloat16)
    weights, index = torch.rand(24, 2, generator=g), torch.randint(0, 8, (24, 2), generator=g)
    per_expert = quant(x, weights, index)  # sorted: `fp8_linear` (W8A8) per expert on CPU
    monkeypatch.setattr(torch, "_scaled_grouped_mm", reference_scaled_grouped_mm)
    quant.impl, quant.scaled_grouped_mm = "grouped", True  # as `use_scaled_grouped_mm` decides on an SM 9.x GPU
    grouped = quant(x, weights, index)
    assert quant.scaled_grouped_mm is True  # ran the kernel: no fallback to dequantizing
    assert float((grouped - per_expert).abs().max() / per_expert.abs().max()) < 0.01


@torch.no_grad()
def test_fp8_experts_fall_back_to_dequantizing_when_the_kernel_refuses(caplog):
    quant = QuantExperts(random_model().layers[0].experts.to(torch.bfloat16), "fp8")
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weights, index = torch.rand(12, 2), torch.randint(0, 8, (12, 2))
    quant.impl, quant.scaled_grouped_mm = "grouped", True  # the real kernel has no CPU version: it raises
    with caplog.at_level("WARNING", logger="letterpress.quant"):
        out = quant(x, weights, index)
    assert quant.scaled_grouped_mm is False and len(caplog.records) == 1
    assert "dequantizing instead" in caplog.records[0].getMessage()
    quant.scaled_grouped_mm = False
    assert torch.equal(out, quant(x, weights, index))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@torch.no_grad()
def test_a_whole_quantized_model_denoises_the_same_grouped_or_per_expert(fmt):
    model = quantize_model(random_model(), fmt)
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 384, (2, 12), generator=g), torch.randint(0, 384, (2, 16), generator=g)

    def logits(impl):
        for layer in model.layers:
            layer.experts.impl = impl
        cache = model.new_cache(2, 48)
        model.encode(prompt, cache)
        return model.denoise(canvas, cache)

    assert float((logits("grouped") - logits("sorted")).abs().max()) < 1e-4


def test_fast_path_groups_quantized_experts_only_on_a_gpu():
    from letterpress.model.fast import apply_fast_path, apply_plain_path

    model = quantize_model(random_model(), "int8")
    apply_fast_path(model)
    assert {layer.experts.impl for layer in model.layers} == {"sorted"}  # CPU: the per-expert int8 kernels
    for layer in model.layers:
        layer.experts.impl = "grouped"
    apply_plain_path(model)
    assert {layer.experts.impl for layer in model.layers} == {"sorted"}


# A smooth random model: q/k norms scaled down (no near-one-hot attention) and every expert active
# (no top-k choice to flip), so logit errors reflect the weights' error, not chaos.
SMOOTH = dict(qk_scale=0.3, num_experts=4, top_k_experts=4)
# Stated tolerance (logits span about +-15 here): max |logit error| and argmax agreement over a denoise
# with and without self-conditioning. Measured: int8 0.4 / 94-100%, fp8 1.3-2.1 / 81-88%, int4 4.6 / 72-75%;
# casting the float32 model to bf16 gives 0.25 / 91-100% for comparison.
MODEL_TOL = {"int8": (1.0, 0.85), "fp8": (4.0, 0.7), "int4": (8.0, 0.6)}


@pytest.mark.parametrize("fmt", FORMATS)
@torch.no_grad()
def test_quantized_model_logits_within_tolerance(fmt):
    base = random_model(**SMOOTH)
    model = quantize_model(copy.deepcopy(base), fmt)
    assert model.quantization == fmt
    assert all(isinstance(layer.experts, QuantExperts) and isinstance(layer.mlp.down_proj, QuantLinear)
               for layer in model.layers)
    assert model_bytes(model) < model_bytes(base)
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 384, (2, 20), generator=g), torch.randint(0, 384, (2, 16), generator=g)

    def logits(m):
        cache = m.new_cache(2, 64)
        m.encode(prompt, cache)
        first = m.denoise(canvas, cache)
        return torch.cat([first, m.denoise(canvas, cache, None, first / 0.8)])

    expected, got = logits(base), logits(model)
    d = drift(expected, got)
    max_error, agreement = MODEL_TOL[fmt]
    assert d["max_abs_logit_error"] < max_error, d
    assert d["argmax_agreement"] >= agreement, d


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@torch.no_grad()
def test_dequantizing_a_quantized_model_gives_float_layers_that_compute_the_same(fmt):
    """dequantize_model undoes quantize_model's modules, not its rounding: plain float layers holding the
    dequantized weights, which denoise as the quantized model does, and train (they are parameters again)."""
    from letterpress.model.layers import Experts

    quantized = quantize_model(random_model(**SMOOTH), fmt)
    expected_w = quantized.layers[0].self_attn.q_proj.qweight.dequantize(torch.float32)
    expected_e = quantized.layers[1].experts.down.dequantize(torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 384, (2, 12), generator=g), torch.randint(0, 384, (2, 16), generator=g)

    def logits(m):
        cache = m.new_cache(2, 48)
        m.encode(prompt, cache)
        return m.denoise(canvas, cache)

    before = logits(quantized)
    model = dequantize_model(quantized)
    assert model.quantization is None
    assert not any(isinstance(m, (QuantLinear, QuantExperts, QuantWeight)) for m in model.modules())
    assert isinstance(model.layers[1].experts, Experts)
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, expected_w)
    assert torch.equal(model.layers[1].experts.down_proj, expected_e)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert float((logits(model) - before).abs().max()) < 1e-3
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in random_model(**SMOOTH).named_parameters()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("quantckpt"), qk_scale=0.3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_llm_quantization_option(checkpoint, fmt):
    params = SamplingParams(max_new_tokens=16, seed=0, max_denoising_steps=4, ignore_eos=True)
    llm = LLM(checkpoint, max_num_seqs=2, max_model_len=64, quantization=fmt, impl="fast")
    outs = llm.generate([[3, 4, 5, 6], [7, 8]], params)
    assert [len(o.token_ids) for o in outs] == [16, 16]
    # on a CPU the fast path keeps quantized experts per expert (their int8 / int4 kernels); "grouped" is for GPUs
    apply_fast_path(llm.model)
    assert isinstance(llm.model.layers[0].experts, QuantExperts) and llm.model.layers[0].experts.impl == "sorted"


def test_unknown_quantization_is_a_clear_error(checkpoint):
    with pytest.raises(NotSupportedError, match="int8, int4, fp8"):
        LLM(checkpoint, quantization="int3")


def test_projected_size_of_the_26b():
    """The released model's text stack (sizes from the public Gemma 4 26B-A4B config, see
    letterpress.quant): ~25.2 B weights; int4 fits in well under 18 GB."""
    text = model_config_from_dict({"model_type": "diffusion_gemma_text", **GEMMA4_26B_A4B_TEXT}).text
    bf16, int8, int4 = (projected_bytes(text, f) for f in (None, "int8", "int4"))
    assert 25.0e9 < bf16["params"] < 25.5e9
    assert 49e9 < bf16["bytes"] < 52e9
    assert int8["bytes"] < 0.53 * bf16["bytes"]
    assert int4["bytes"] < 18e9
