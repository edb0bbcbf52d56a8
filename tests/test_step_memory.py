"""Bounded step memory (issue 13, item 4): the chunked passes give the unchunked bits, the fused sampler that
draws into its spent logits gives the plain sampler's bits, and one runner step at the released vocabulary
allocates at most about two [canvas, vocab] float32 tensors per row (measured by allocation accounting:
sizes, not timings)."""

from __future__ import annotations

import pytest
import torch

import letterpress.chunks as chunks
from letterpress.chunks import position_slices
from letterpress.config import GenerationDefaults, model_config_from_dict
from letterpress.engine.request import Request, SamplingParams
from letterpress.engine.runner import Row, Runner
from letterpress.fast_sampling import fused_denoise_step
from letterpress.model import DiffusionGemma
from letterpress.model.fast import apply_fast_path, apply_plain_path
from letterpress.profiling import AllocationPeak
from letterpress.sampling import GeneratorDraws, denoise_step, token_entropy

from .fast_fixtures import random_model


def test_position_slices_cover_evenly_within_the_budget():
    for length, vocab, budget in [(256, 262_144, 32 * 2**20), (33, 100, 4 * 100 * 8), (5, 10, 1), (0, 10, 400)]:
        slices = position_slices(length, vocab, budget)
        assert [i for s in slices for i in range(s.start, s.stop)] == list(range(length))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) <= max(1, budget // (4 * vocab)) and max(sizes) - min(sizes) <= 1
    assert len(position_slices(256, 262_144)) == 8  # the default: 32 positions at the released vocabulary


def _logits(rows=3, length=24, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, vocab, generator=g) * torch.linspace(0.5, 25, length)[None, :, None]


@pytest.mark.parametrize("positions", [1, 5, 24, 1000])
def test_chunked_entropy_is_bitwise_the_unchunked_entropy(positions):
    logits = _logits()
    logp = torch.log_softmax(logits, dim=-1)
    unchunked = -(logp.exp() * logp).sum(-1)
    assert torch.equal(token_entropy(logits, chunk_bytes=positions * 4 * 500), unchunked)


def test_proposals_into_is_torch_multinomial():
    probs = torch.softmax(_logits(1)[0], -1)
    a, b = GeneratorDraws(7), GeneratorDraws(7)
    scratch = torch.full_like(probs, float("nan"))
    assert torch.equal(a.proposals_into(probs, scratch, 0, 0), b.proposals(probs, 0, 0))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())  # the same stream afterwards
    assert torch.equal(a.noise(24, 500, 0, 0), b.noise(24, 500, 0, 0))


@pytest.mark.parametrize("positions", [1, 5, 24, 1000])
def test_proposals_from_logits_is_torch_multinomial_of_the_softmax(positions):
    logits = _logits(1)[0]
    a, b = GeneratorDraws(7), GeneratorDraws(7)
    chunked = a.proposals_from_logits(logits, chunk_bytes=positions * 4 * 500)
    assert torch.equal(chunked, b.proposals(torch.softmax(logits, -1, dtype=torch.float32), 0, 0))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_plain_step_in_place_is_the_plain_step():
    """The runner hands its logits over (divided in place, the sampling softmax a chunk at a time): the
    same outcome, bit for bit, as the step on a copy."""
    logits = _logits()
    temps, bounds = torch.tensor([0.8, 0.55, 0.41]), torch.tensor([0.1, 1.0, 5.0])
    args = dict(canvas_index=[0, 2, 1], step_index=[0, 7, 3], greedy=[False, True, False])
    copy = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], **args)
    handed = logits.clone()
    in_place = denoise_step(handed, temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], in_place=True,
                            chunk_bytes=3 * 4 * 500, **args)
    for name in ("next_canvas", "argmax", "accept_mask", "mean_entropy", "processed_logits"):
        assert torch.equal(getattr(in_place, name), getattr(copy, name)), name
    assert in_place.processed_logits.data_ptr() == handed.data_ptr()


@pytest.mark.parametrize("sc_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 7, 1000])
def test_chunked_fused_sampler_drawing_into_its_logits_is_the_plain_sampler(sc_dtype, positions):
    logits = _logits()
    temps, bounds = torch.tensor([0.8, 0.55, 0.41]), torch.tensor([0.1, 1.0, 5.0])
    args = dict(canvas_index=[0, 2, 1], step_index=[0, 7, 3], greedy=[False, True, False])
    plain = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], **args)
    fused = fused_denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], sc_dtype=sc_dtype,
                               keep_processed=False, chunk_bytes=positions * 4 * 500, **args)
    for name in ("next_canvas", "argmax", "accept_mask", "mean_entropy"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    assert fused.processed_logits is None  # spent: it held the multinomial noise
    stored = plain.processed_logits.to(sc_dtype)  # what the plain runner keeps
    assert torch.equal(fused.sc_probs, torch.softmax(stored, -1, dtype=torch.float32).to(sc_dtype))


def test_a_draws_subclass_that_overrides_proposals_is_called():
    """The fused step draws into its logits only through the class that defines `proposals` itself."""
    calls = []

    class Recording(GeneratorDraws):
        def proposals(self, probs, canvas, step):
            calls.append(step)
            return super().proposals(probs, canvas, step)

    logits = _logits(rows=2)
    draws = [GeneratorDraws(1), Recording(2)]
    out = fused_denoise_step(logits.clone(), torch.tensor([0.8, 0.5]), torch.tensor([1.0, 1.0]), draws, [0, 0], [4, 5],
                             keep_processed=False)
    plain = denoise_step(logits.clone(), torch.tensor([0.8, 0.5]), torch.tensor([1.0, 1.0]),
                         [GeneratorDraws(1), GeneratorDraws(2)], [0, 0], [4, 5])
    assert calls == [5] and torch.equal(out.next_canvas, plain.next_canvas)


@torch.no_grad()
def test_chunked_lm_head_and_self_conditioning_match_unchunked(monkeypatch):
    """The softmax and soft-capping are per position, so chunking changes no bit there; the matmuls may pick
    another BLAS kernel for another row count (measured: identical for chunks of >= 16 rows here)."""
    model = random_model()
    hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    sc = torch.randn(2, 16, 384, generator=torch.Generator().manual_seed(1)) * 3
    whole = model.lm_logits(hidden), model.soft_embeddings(sc)
    logits = torch.nn.functional.linear(hidden, model.embed_tokens.weight)
    cap = model.text_config.final_logit_softcapping
    torch.testing.assert_close(whole[0], torch.tanh(logits / cap) * cap if cap else logits, atol=0, rtol=0)
    for positions in (1, 5, 16):
        monkeypatch.setattr(chunks, "CHUNK_BYTES", positions * 4 * 384)
        torch.testing.assert_close(model.lm_logits(hidden), whole[0], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(model.soft_embeddings(sc), whole[1], atol=1e-5, rtol=1e-6)
        probs = torch.softmax(sc, -1, dtype=torch.float32)
        assert torch.equal(model.soft_embeddings(None, probs), model.soft_embeddings(sc))


# ----------------------------------------------------------------------------------------- the step's peak
VOCAB, CANVAS = 262_144, 32  # the released vocabulary; a short canvas keeps the test small (units scale with C)


@pytest.fixture(scope="module")
def real_vocab_model():
    """dtype -> a two-layer model with hidden size 16 and the released vocabulary (built once per dtype)."""
    text = dict(model_type="diffusion_gemma_text", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=16,
                num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, layer_types=["sliding_attention", "full_attention"],
                final_logit_softcapping=30.0)
    config = model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": CANVAS, "text_config": text})
    models: dict[torch.dtype, DiffusionGemma] = {}

    def build(dtype: torch.dtype) -> DiffusionGemma:
        if dtype not in models:
            model = DiffusionGemma(config).init_weights(std=0.5, generator=torch.Generator().manual_seed(0))
            models[dtype] = model.to(dtype).eval()
        return models[dtype]

    return build


def _third_step_peak(model, impl: str, batch: int) -> float:
    """Peak bytes allocated during a runner's third denoising step, per row, in [CANVAS, VOCAB] float32 units."""
    (apply_fast_path if impl == "fast" else apply_plain_path)(model)
    try:
        runner = Runner(model, batch, 64, impl=impl)
        params = SamplingParams(max_new_tokens=CANVAS, max_denoising_steps=6, stability_threshold=6,
                                seed=0).resolve(GenerationDefaults())
        rows = [Row(request=Request([3, 4, 5, 6], params, GeneratorDraws(i)), slot=i, pending=[3, 4, 5, 6])
                for i in range(batch)]
        with torch.inference_mode():
            runner.step(rows)
            runner.step(rows)
            assert all(r.denoising and r.sc_logits is not None for r in rows)
            with AllocationPeak() as peak:
                runner.step(rows)
            assert all(r.sc_logits is not None for r in rows)
    finally:
        apply_plain_path(model)
    return peak.peak / (batch * CANVAS * VOCAB * 4)


CHUNK = 1 / 8  # chunk temporaries: 4 positions of 32 here, as 32 positions of 256 at the released canvas


@pytest.mark.parametrize("impl, dtype, batch, bound", [
    # fast: the logits, the next step's softmax (the sampler draws into the spent logits), one chunk
    ("fast", torch.float32, 1, 2 + CHUNK),
    ("fast", torch.float32, 2, 2 + CHUNK / 2),
    # bf16 model: the softmax state is bf16, plus a float32 softmax for the row being drawn
    ("fast", torch.bfloat16, 1, 1.5 + 1 + CHUNK),
    # plain: the logits (divided in place: the processed logits it returns), one row's multinomial noise
    # (the sampling softmax divided into it a chunk at a time), one chunk
    ("plain", torch.float32, 1, 1 + 1 + CHUNK),
    ("plain", torch.float32, 8, 1 + (1 + CHUNK) / 8),
])
def test_step_peak_per_row_is_bounded_at_the_released_vocabulary(real_vocab_model, monkeypatch, impl, dtype, batch,
                                                                  bound):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * 4 * VOCAB)
    peak = _third_step_peak(real_vocab_model(dtype), impl, batch)
    assert bound - 0.05 <= peak <= bound + 0.01, peak  # + 0.01: the small tensors (canvases, hidden states)
