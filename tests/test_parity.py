"""Our model and generation loop against transformers 5.23's DiffusionGemma (the reference), on tiny random
checkpoints saved by transformers and loaded by our loader."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (  # noqa: E402
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
)

from letterpress import LLM, SamplingParams  # noqa: E402
from letterpress.model import DiffusionGemma  # noqa: E402
from letterpress.model.fast import apply_fast_path, apply_plain_path  # noqa: E402
from letterpress.sampling import entropy_bound_accept, temperature, token_entropy  # noqa: E402

from .reference import RecordedDraws, build_reference, reference_bidirectional_fix  # noqa: E402

CANVAS = 16
CONFIGS = {
    # sliding window (8) shorter than the prompts; sliding and full layers alternate
    "sliding": {},
    # the encoder is bidirectional and the stored window (14) is halved to 8 on load
    "bidirectional_all": {"use_bidirectional_attention": "all", "sliding_window": 14},
    "bidirectional_vision": {"use_bidirectional_attention": "vision"},
    # the default 5:1 layer pattern, top-3 routing
    "top3_default_pattern": {"num_hidden_layers": 6, "layer_types": None, "top_k_experts": 3},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # Calm random weights: large ones make self-conditioning chaotic (float noise grows ~5x per step).
    reference = build_reference(folder, canvas_length=CANVAS, weight_std=0.05, embed_std=0.5, **CONFIGS[request.param])
    ours = DiffusionGemma.from_pretrained(folder)
    if request.param == "bidirectional_all":
        assert ours.text_config.sliding_window == reference.config.text_config.sliding_window == 8
        with reference_bidirectional_fix():
            yield folder, reference, ours
    else:
        yield folder, reference, ours


def padded_batch(lengths: list[int], vocab: int = 512, seed: int = 0):
    """Left-padded ids and mask for the reference, and the unpadded prompts for us."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    return prompts, ids, mask


@pytest.fixture(params=["plain", "fast"])
def impl(request, checkpoint):
    """The plain model, or the fast path (grouped MoE, sliced decoder attention) switched on for one test."""
    _, _, ours = checkpoint
    if request.param == "fast":
        apply_fast_path(ours)
    try:
        yield request.param
    finally:
        apply_plain_path(ours)


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
@torch.no_grad()
def test_encoder_cache_and_denoise_logits_match(checkpoint, impl, cache_kind):
    """Prompt -> cache -> denoise (with and without self-conditioning) -> a canvas appended through the
    encoder -> denoise again, for a batch of prompts of different lengths. The paged cache uses blocks of 4
    positions, so with a window of 8 the sliding layers give blocks back and reuse them as rows grow."""
    _, ref, ours = checkpoint
    lengths = [21, 13, 6]
    prompts, ids, mask = padded_batch(lengths)
    b, width = ids.shape
    pad = torch.tensor([width - n for n in lengths])
    # Per-row positions make the reference's RoPE equal to ours (we number each row's tokens from 0).
    positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions)

    if cache_kind == "paged":
        our_cache = ours.new_paged_cache(b, 128, block_size=4, prefill_chunk=32)
    else:
        our_cache = ours.new_cache(b, 128)
    our_ids = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        our_ids[i, : len(p)] = p
    ours.encode(our_ids, our_cache, input_lengths=torch.tensor(lengths))

    def check_cache(total: list[int]):
        for layer, spec in enumerate(ours.text_config.layers):
            ref_k, ref_v = cache.layers[layer].keys, cache.layers[layer].values
            kept = ref_k.shape[2]  # sliding layers keep only the last window - 1 positions
            for row, n in enumerate(total):
                visible = min(kept, n)
                our_k, our_v = our_cache.read(layer, torch.tensor([row]), n - visible, n)
                torch.testing.assert_close(our_k[0], ref_k[row, :, kept - visible:], atol=1e-4, rtol=0)
                torch.testing.assert_close(our_v[0], ref_v[row, :, kept - visible:], atol=1e-4, rtol=0)

    check_cache(lengths)
    canvas = torch.randint(0, 512, (b, CANVAS), generator=torch.Generator().manual_seed(1))
    dec_mask = torch.nn.functional.pad(mask, (0, CANVAS), value=True)
    dec_pos = torch.tensor(lengths)[:, None] + torch.arange(CANVAS)
    ref_logits = ref(decoder_input_ids=canvas, past_key_values=cache, decoder_attention_mask=dec_mask,
                     decoder_position_ids=dec_pos).logits
    our_logits = ours.denoise(canvas, our_cache)
    assert ref_logits.abs().max() > 1.0  # the fixture's weights give peaked, non-trivial logits
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)

    sc_mask = torch.tensor([True, False, True])
    ref_sc = ref(decoder_input_ids=canvas, past_key_values=cache, decoder_attention_mask=dec_mask,
                 decoder_position_ids=dec_pos, self_conditioning_logits=ref_logits, self_conditioning_mask=sc_mask).logits
    torch.testing.assert_close(ours.denoise(canvas, our_cache, None, ref_logits, sc_mask), ref_sc, atol=1e-4, rtol=0)

    # The canvas joins the context: both caches grow by CANVAS and the next canvas reads them.
    ref.model.encoder(input_ids=canvas, attention_mask=dec_mask, past_key_values=cache, position_ids=dec_pos)
    ours.encode(canvas, our_cache)
    check_cache([n + CANVAS for n in lengths])
    if cache_kind == "paged" and ours.text_config.sliding_window:  # sliding layers hold only their window
        sliding = next(k for k in our_cache.kinds if k.window is not None)
        held = our_cache.pools[sliding.name].num_held
        assert held <= sum(-(-(our_cache.cfg.sliding_window - 1) // 4) + 1 for _ in lengths) < sum(-(-(n + CANVAS) // 4) for n in lengths)
    dec_mask2 = torch.nn.functional.pad(dec_mask, (0, CANVAS), value=True)
    ref_logits2 = ref(decoder_input_ids=canvas.flip(1), past_key_values=cache, decoder_attention_mask=dec_mask2,
                      decoder_position_ids=dec_pos + CANVAS).logits
    torch.testing.assert_close(ours.denoise(canvas.flip(1), our_cache), ref_logits2, atol=1e-4, rtol=0)


def test_acceptance_schedule_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, 50, generator=g) * torch.linspace(0.5, 12, 32)[None, :, None]
    for bound in (0.1, 1.0, 5.0):
        sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=32, vocab_size=50,
                                      max_denoising_steps=48)
        sampler.accept_canvas(torch.zeros(4, 32, dtype=torch.long), torch.ones(4, 32, dtype=torch.long), logits, 1)
        ours = entropy_bound_accept(token_entropy(logits), bound)
        assert torch.equal(ours, sampler.accepted_token_mask)
        assert ours.sum(-1).min() >= 1  # the lowest-entropy position is always accepted
    schedule = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    for step in range(48):
        remaining = torch.tensor(48 - step, dtype=torch.int32)
        expected = schedule(None, logits, cur_step=remaining)
        assert torch.equal(logits / torch.tensor(temperature(step, 48, 0.4, 0.8), dtype=torch.float32), expected)


SAMPLERS = {
    "defaults": dict(),
    # accepts many tokens per step and stops early: exercises stability/confidence and frozen rows
    "loose": dict(entropy_bound=3.0, confidence_threshold=2.0, max_denoising_steps=12),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@torch.no_grad()
def test_generate_matches_reference_with_same_draws(checkpoint, sampler):
    """The reference generates each prompt alone (its draws recorded); we generate all prompts in one batch
    with those draws replayed per row. Identical tokens, stop reasons and tokens/forward.

    (The reference numbers left-padded rows' positions from the padding, which changes the logits by ~1e-5;
    self-conditioning amplifies that over the steps of a random model, so a padded reference batch is not a
    bitwise target. Per-row positions are also what makes our rows batch-invariant.)"""
    folder, ref, _ = checkpoint
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g) for n in (19, 9, 4)]
    eos = [1, 7, 11, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]  # frequent enough to end some rows early
    settings = {"max_denoising_steps": 8, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
                "confidence_threshold": 0.005, "entropy_bound": 0.1, **SAMPLERS[sampler]}
    max_new = 3 * CANVAS
    expected, draws = [], []
    for row, prompt in enumerate(prompts):
        recorded = RecordedDraws()
        torch.manual_seed(5 + row)
        with recorded.recording(batch=1, canvas=CANVAS):
            out = ref.generate(
                prompt[None], max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
                max_denoising_steps=settings["max_denoising_steps"], t_min=settings["t_min"], t_max=settings["t_max"],
                stability_threshold=settings["stability_threshold"], confidence_threshold=settings["confidence_threshold"],
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"]),
            )
        expected.append((out.sequences[0, len(prompt):].tolist(), float(out.tokens_per_forward[0])))
        draws.append(recorded.for_row(0))

    # blocks of 4 positions: the sliding layers (window 8) recycle blocks as the rows grow
    llm = LLM(folder, max_num_seqs=4, max_model_len=128, block_size=4)
    params = SamplingParams(max_new_tokens=max_new, eos_token_ids=eos, **settings)
    outs = llm.generate([p.tolist() for p in prompts], params, draws=draws)
    for row, (out, (tokens, tokens_per_forward)) in enumerate(zip(outs, expected)):
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        assert out.token_ids == tokens[:stop], f"row {row}"
        assert out.finish_reason == ("stop" if stop is not None else "length")
        assert out.tokens_per_forward == pytest.approx(tokens_per_forward)
