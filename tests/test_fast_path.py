"""The fast path against the plain path: every piece gives the plain piece's logits (within dtype
tolerance) and, given the same draws, the same tokens. No timing here (see benchmarks/)."""

from __future__ import annotations

import json

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.fast_sampling import fused_denoise_step
from letterpress.model.fast import (apply_fast_path, apply_plain_path, compile_layers, grouped_mm_supported,
                                    moe_forward, resolve_moe_method, sort_by_expert, uncompile_layers)
from letterpress.model.layers import Experts
from letterpress.sampling import GeneratorDraws, denoise_step

from .fast_fixtures import random_model, save_checkpoint

METHODS = ["grouped_mm", "sorted", "bmm"]


def routed(n: int, hidden: int, experts: int, k: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(n, experts, generator=g) * 2, -1)
    weights, index = torch.topk(probs, k)
    return x, weights / weights.sum(-1, keepdim=True), index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 5, 64])
def test_moe_methods_match_the_expert_loop(method, dtype, n):
    if method == "grouped_mm" and not grouped_mm_supported(torch.device("cpu"), dtype):
        pytest.skip("torch._grouped_mm is not available here")
    model = random_model(num_experts=8, top_k_experts=2)
    experts: Experts = model.layers[0].experts.to(dtype)
    x, weights, index = routed(n, 64, 8, 2, dtype=dtype)  # with n=1 and 5 most experts get no token
    expected = experts(x, weights, index)
    got = moe_forward(experts.gate_up_proj, experts.down_proj, x, weights, index, method)
    assert got.dtype == expected.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, expected, **tol)


def test_sort_by_expert():
    index = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, token, counts = sort_by_expert(index, 5)
    assert counts.tolist() == [2, 1, 1, 2, 0]
    assert index.reshape(-1)[order].tolist() == [0, 0, 1, 2, 3, 3]
    assert token.tolist() == [0, 1, 2, 1, 0, 2]  # tokens ascend within an expert (stable sort)


def test_resolve_moe_method():
    cpu = torch.device("cpu")
    assert resolve_moe_method("sorted", cpu, torch.float32) == "sorted"
    assert resolve_moe_method("auto", cpu, torch.float32) in ("grouped_mm", "sorted")
    with pytest.raises(ValueError):
        resolve_moe_method("magic", cpu, torch.float32)


def _encoded(model, lengths, slots_total=4, capacity=96, seed=0):
    """A cache whose slots hold prompts of the given lengths (slot i <- lengths[i])."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.text_config.vocab_size
    cache = model.new_cache(slots_total, capacity)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    model.encode(ids, cache, torch.arange(len(lengths)), torch.tensor(lengths))
    return cache


@torch.no_grad()
@pytest.mark.parametrize("case", ["uniform", "ragged", "ragged_noncontiguous", "single"])
def test_fast_decoder_attention_matches_plain(case):
    """Sliced keys (no mask) for equal lengths, a small mask for ragged rows; sliding window 8 is shorter
    than every prompt, so the window slicing matters. (A different summation order changes the last bits;
    `qk_scale` keeps the random model from amplifying them.)"""
    model = random_model(qk_scale=0.3)
    lengths = {"uniform": [21, 21, 21], "ragged": [21, 13, 30], "ragged_noncontiguous": [21, 13, 30],
               "single": [27]}[case]
    cache = _encoded(model, lengths)
    slots = {"ragged_noncontiguous": torch.tensor([2, 0])}.get(case, torch.arange(len(lengths)))
    canvas = torch.randint(0, 384, (len(slots), 16), generator=torch.Generator().manual_seed(1))
    plain = model.denoise(canvas, cache, slots)
    sc = plain / 0.7
    plain_sc = model.denoise(canvas, cache, slots, sc, torch.tensor([True] + [False] * (len(slots) - 1)))
    apply_fast_path(model)
    try:
        fast = model.denoise(canvas, cache, slots)
        fast_sc = model.denoise(canvas, cache, slots, sc, torch.tensor([True] + [False] * (len(slots) - 1)))
    finally:
        apply_plain_path(model)
    assert plain.abs().max() > 1.0
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast_sc, plain_sc, atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_self_conditioning_probs_equal_logits():
    """The fused sampler hands the model the softmax instead of the logits: same result, bit for bit."""
    model = random_model()
    cache = _encoded(model, [19, 11])
    canvas = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    logits = model.denoise(canvas, cache) / 0.6
    mask = torch.tensor([True, False])
    expected = model.denoise(canvas, cache, None, logits, mask)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    assert torch.equal(model.denoise(canvas, cache, None, None, mask, self_conditioning_probs=probs), expected)


def _peaked_logits(rows=3, length=32, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, vocab, generator=g) * torch.linspace(0.5, 25, length)[None, :, None]


@pytest.mark.parametrize("greedy", [None, [False, True, False]])
@pytest.mark.parametrize("clamped", [False, True])
def test_fused_sampler_is_bitwise_the_plain_sampler(greedy, clamped):
    logits = _peaked_logits()
    temps = torch.tensor([0.8, 0.55, 0.41])
    bounds = torch.tensor([0.1, 1.0, 5.0])
    args = dict(canvas_index=[0, 2, 1], step_index=[0, 7, 3])
    if clamped:  # rows 0 and 2 pin some positions (infill / edit), row 1 is free
        clamp_mask = torch.zeros(3, 32, dtype=torch.bool)
        clamp_mask[0, :10], clamp_mask[2, 5::3] = True, True
        args.update(clamp_tokens=torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(9)),
                    clamp_mask=clamp_mask)
    plain = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], greedy=greedy, **args)
    fused = fused_denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], greedy=greedy,
                               sc_dtype=torch.float32, **args)
    for name in ("next_canvas", "argmax", "accept_mask", "mean_entropy", "processed_logits"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    assert 0 < int(plain.accept_mask.sum()) < plain.accept_mask.numel()
    # the self-conditioning input is exactly the softmax the model would take of the stored logits
    assert torch.equal(fused.sc_probs, torch.softmax(plain.processed_logits, -1, dtype=torch.float32))
    if clamped:
        assert torch.equal(fused.next_canvas[0, :10], args["clamp_tokens"][0, :10])
    bf16 = fused_denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)],
                              sc_dtype=torch.bfloat16, **args)
    stored = plain.processed_logits.to(torch.bfloat16)  # what the plain runner keeps for a bf16 model
    assert torch.equal(bf16.sc_probs, torch.softmax(stored, -1, dtype=torch.float32).to(torch.bfloat16))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A chaotic random model (unit q/k norms: near-one-hot attention that flips at the last bit) and a
    calm one (q/k norms scaled by 0.3)."""
    return {"chaotic": save_checkpoint(tmp_path_factory.mktemp("chaotic"), qk_scale=1.0),
            "calm": save_checkpoint(tmp_path_factory.mktemp("calm"), qk_scale=0.3)}


PROMPTS = [list(range(3, 3 + n)) for n in (19, 9, 4)]
PARAMS = [SamplingParams(max_new_tokens=40, seed=s, max_denoising_steps=8, eos_token_ids=[1, 7, 11]) for s in (0, 1, 2)]
LOOSE = SamplingParams(max_new_tokens=32, seed=5, max_denoising_steps=10, entropy_bound=3.0, confidence_threshold=2.0)


def _generate(llm):
    return [(o.token_ids, o.steps_per_canvas, o.finish_reason) for o in llm.generate(PROMPTS, PARAMS) + llm.generate(PROMPTS[0], LOOSE)]


@torch.no_grad()
def test_fused_sampler_in_the_engine_is_token_identical(checkpoints):
    """The runner's fused sampler with the plain model: bit-for-bit the same steps, so the same tokens even
    on the chaotic model, for a batch of rows of different prompt lengths that stop at different times."""
    plain = _generate(LLM(checkpoints["chaotic"], max_num_seqs=4, max_model_len=128))
    llm = LLM(checkpoints["chaotic"], max_num_seqs=4, max_model_len=128, impl="fast")
    apply_plain_path(llm.model)  # keep only the runner's fused sampler
    assert _generate(llm) == plain
    assert any(len(o[1]) > 1 for o in plain)  # several canvases, so the cache grows


@torch.no_grad()
def test_generate_fast_is_token_identical_to_plain(checkpoints):
    """The whole fast path. Grouped MoE and sliced attention add up in a different order (last-bit
    differences, see the logits tests), which self-conditioning can amplify on a chaotic random model; on
    the calm one the tokens are identical."""
    plain = _generate(LLM(checkpoints["calm"], max_num_seqs=4, max_model_len=128))
    assert _generate(LLM(checkpoints["calm"], max_num_seqs=4, max_model_len=128, impl="fast")) == plain


def _require_compile() -> None:
    """Skip where torch.compile cannot build kernels (inductor needs a working C++ compiler on a CPU)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as e:  # no C++ toolchain for inductor, ...
        pytest.skip(f"torch.compile cannot build kernels here (inductor needs a C++ compiler): {e}")


@torch.no_grad()
def test_compiled_layers_match_plain_logits():
    """torch.compile fuses differently, so logits match within float tolerance (not bit for bit)."""
    _require_compile()
    model = random_model(qk_scale=0.3)
    cache = _encoded(model, [19, 11], capacity=64)
    canvas = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = model.denoise(canvas, cache)
    apply_fast_path(model)
    compile_layers(model)
    try:
        got = model.denoise(canvas, cache)
    finally:
        uncompile_layers(model)
        apply_plain_path(model)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_compiled_int8_layers_match_eager_and_never_hit_the_recompile_limit():
    """int8 experts run their per-expert loop outside the compiled graphs: before, each pattern of empty experts
    recompiled, and three denoises hit dynamo's recompile limit (a warning storm, 20 s instead of 7)."""
    import logging

    from letterpress.quant import quantize_model

    _require_compile()
    model = quantize_model(random_model(qk_scale=0.3), "int8")
    g = torch.Generator().manual_seed(0)
    expected, got, warnings = [], [], []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    dynamo_log = logging.getLogger("torch._dynamo")  # it does not propagate to the root logger caplog watches
    dynamo_log.addHandler(handler)
    try:
        for compiled in (False, True):
            if compiled:
                compile_layers(model)
            for i in range(3):
                g.manual_seed(i)
                cache = model.new_cache(1 + i, 64)
                model.encode(torch.randint(3, 384, (1 + i, 10 + i), generator=g), cache)
                (got if compiled else expected).append(model.denoise(torch.randint(0, 384, (1 + i, 16), generator=g),
                                                                     cache))
    finally:
        uncompile_layers(model)
        dynamo_log.removeHandler(handler)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert not [w for w in warnings if "recompile" in w]


def test_profile_option_writes_a_chrome_trace(tmp_path, capsys):
    from letterpress.cli import main

    out = tmp_path / "trace"
    code = main(["generate", "def f(x):", "--max-new-tokens", "16", "--seed", "0", "--impl", "fast",
                 "--quantization", "int8", "--profile", str(out), "--profile-steps", "3"])
    assert code == 0
    traces = list(out.glob("*.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("denoise" in str(e.get("name", "")) for e in events)
