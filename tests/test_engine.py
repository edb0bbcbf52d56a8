"""Engine behaviour users rely on: exact max_new_tokens, seeds, batch invariance, EOS, budgets, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.engine.request import CanvasEvent
from letterpress.errors import NotSupportedError, RequestError
from letterpress.sampling import GeneratorDraws

from .reference import build_reference

FAST = dict(max_denoising_steps=6)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    build_reference(folder, canvas_length=16, weight_std=0.05, embed_std=0.5)
    return LLM(folder, max_num_seqs=8, max_model_len=160)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("max_new", [1, 5, 16, 21, 48])
def test_max_new_tokens_is_exact(llm, max_new):
    out = llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=max_new, ignore_eos=True, seed=0, **FAST))[0]
    assert len(out.token_ids) == max_new and out.finish_reason == "length"
    assert out.canvases == -(-max_new // 16)


def test_seed_determines_output_and_batch_does_not(llm):
    batch = prompts(6, seed=1)
    params = [SamplingParams(max_new_tokens=32, seed=100 + i, **FAST) for i in range(6)]
    together = llm.generate(batch, params)
    for i in (0, 3, 5):
        alone = llm.generate(batch[i], params[i])[0]
        assert alone.token_ids == together[i].token_ids
        assert alone.steps_per_canvas == together[i].steps_per_canvas
    other_seed = llm.generate(batch[0], SamplingParams(max_new_tokens=32, seed=7, **FAST))[0]
    assert other_seed.token_ids != together[0].token_ids


def test_more_requests_than_slots_queue_and_finish(llm):
    outs = llm.generate(prompts(11, seed=2), SamplingParams(max_new_tokens=20, seed=0, **FAST))
    assert len(outs) == 11 and all(o.finish_reason in ("stop", "length") for o in outs)
    assert not llm.scheduler.has_work() and sorted(llm.scheduler.free_slots) == list(range(8))


def test_eos_stops_and_is_not_returned(llm):
    base = llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=32, ignore_eos=True, seed=3, **FAST))[0]
    eos = base.token_ids[4]
    first = base.token_ids.index(eos)
    out = llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=32, eos_token_ids=[eos], seed=3, **FAST))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:first]
    assert out.canvases == 1
    # the reference's tokens/forward counts the stop token itself
    assert out.tokens_per_forward == pytest.approx((first + 1) / out.decoder_passes)


def test_canvas_events(llm):
    events: list[CanvasEvent] = []
    request = llm.make_request(prompts(1)[0], SamplingParams(max_new_tokens=20, ignore_eos=True, seed=0, **FAST),
                               listener=events.append, want_drafts=True)
    out = llm.run([request])[0]
    finals = [e for e in events if e.final]
    assert [len(e.token_ids) for e in finals] == [16, 4]
    assert sum((e.token_ids for e in finals), []) == out.token_ids
    drafts = [e for e in events if not e.final]
    assert len(drafts) == out.decoder_passes and all(len(e.token_ids) == 16 for e in drafts)


def test_no_early_stop_means_max_steps_and_threshold_zero_stops_on_confidence(llm):
    out = llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=16, seed=0, max_denoising_steps=5,
                                                     stability_threshold=9))[0]
    assert out.steps_per_canvas == [5]
    # stability 0 and a huge confidence threshold: the first step already satisfies the criterion
    out = llm.generate(prompts(1)[0], SamplingParams(max_new_tokens=16, seed=0, stability_threshold=0,
                                                     confidence_threshold=1e9))[0]
    assert out.steps_per_canvas == [1]


def test_generator_draws_are_reproducible():
    a, b = GeneratorDraws(5), GeneratorDraws(5)
    probs = torch.softmax(torch.randn(8, 50), -1)
    assert torch.equal(a.initial_canvas(8, 50, 0), b.initial_canvas(8, 50, 0))
    assert torch.equal(a.proposals(probs, 0, 0), b.proposals(probs, 0, 0))


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (SamplingParams(max_denoising_steps=-1), "max_denoising_steps"),
    (SamplingParams(t_min=0.9, t_max=0.5), "t_min <= t_max"),
    (SamplingParams(entropy_bound=0), "entropy_bound"),
    (SamplingParams(seed="x"), "seed"),
    (SamplingParams(max_new_tokens=10_000), "exceeds max_model_len"),
    # what made a whole batch fail (issue 12): an underflowing schedule, an int32 overflow
    (SamplingParams(t_min=0, t_max=1e-50), "t_max must lie in"),
    (SamplingParams(max_denoising_steps=3_000_000_000), r"max_denoising_steps must be a positive integer \(at most 16777216\)"),
    (SamplingParams(t_min=float("nan")), "t_min must be a finite number"),
    (SamplingParams(t_max=float("inf")), "t_max must be a finite number"),
    (SamplingParams(t_max=1e6), "t_max must lie in"),
    (SamplingParams(entropy_bound=float("inf")), "entropy_bound must be a finite number"),
    (SamplingParams(confidence_threshold=float("nan")), "confidence_threshold"),
    (SamplingParams(stability_threshold=2**40), "stability_threshold"),
    (SamplingParams(max_new_tokens=True), "max_new_tokens"),
    (SamplingParams(seed=2**64), "seed"),
    (SamplingParams(seed=-(2**63) - 1), "seed"),
    (SamplingParams(eos_token_ids=[1, "x"]), "eos_token_ids"),
])
def test_bad_requests(llm, params, message):
    with pytest.raises(RequestError, match=message):
        llm.generate([5, 6, 7], params)


def test_edge_values_that_the_engine_honours(llm):
    """The ends of the accepted ranges run: a constant schedule at the lowest temperature, extreme seeds."""
    for params in (SamplingParams(t_min=1e-6, t_max=1e-6), SamplingParams(t_min=0, t_max=100.0),
                   SamplingParams(seed=2**64 - 1), SamplingParams(seed=-(2**63))):
        out = llm.generate([5, 6, 7], replace(params, max_new_tokens=16, **FAST))[0]
        assert out.finish_reason in ("stop", "length") and out.error is None


def test_bad_prompts(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match=r"\[0, 512\)"):
        llm.generate([5, 600], SamplingParams(max_new_tokens=16))
    with pytest.raises(RequestError, match="exceeds max_model_len") as error:
        llm.generate([5] * 150, SamplingParams(max_new_tokens=16))
    # one canvas alone does not fit beside this prompt: fewer tokens cannot help, a shorter prompt can
    assert "lower max_new_tokens" not in str(error.value)
    assert "shorten the prompt to at most 144 tokens" in str(error.value)
    assert "raise max_model_len (--max-model-len) to at least 166" in str(error.value)
    with pytest.raises(RequestError, match="exceeds max_model_len") as error:
        llm.generate([5] * 10, SamplingParams(max_new_tokens=200))
    # 13 canvases fill the context even without a prompt: only fewer tokens (or more room) help
    assert "lower max_new_tokens to at most 144" in str(error.value) and "shorten" not in str(error.value)
    with pytest.raises(RequestError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", SamplingParams(max_new_tokens=16))


def test_prompts_and_params_as_vllm_code_passes_them(llm):
    """Token ids as numpy or torch arrays, params as a tuple or under vLLM's keyword `sampling_params`: the same
    answer as a list of ints; bools and floats are not token ids; a wrong params type is named."""
    import numpy as np

    ids, params = prompts(1)[0], SamplingParams(max_new_tokens=16, seed=3, **FAST)
    want = llm.generate(ids, params)[0].token_ids
    assert llm.generate(np.array(ids), params)[0].token_ids == want
    assert llm.generate(torch.tensor(ids), sampling_params=params)[0].token_ids == want
    assert llm.generate([ids, ids], (params, params))[1].token_ids == want
    for bad in ([True, 5], [2.0, 3]):
        with pytest.raises(RequestError, match="list of token ids"):
            llm.generate(bad, params)
    with pytest.raises(RequestError, match="not both"):
        llm.generate(ids, params, sampling_params=params)
    with pytest.raises(RequestError, match="params must be SamplingParams, got dict"):
        llm.generate(ids, {"seed": 3})
    with pytest.raises(RequestError, match="no prompts given"):
        llm.generate([], params)


def test_text_only_model_refuses_images():
    llm = LLM()  # the embedded default has a tokenizer and chat template, and no vision tower
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}
    with pytest.raises(NotSupportedError, match="no vision tower"):
        llm.chat([image], SamplingParams(max_new_tokens=4))
