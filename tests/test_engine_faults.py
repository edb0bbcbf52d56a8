"""Faults stay in their row (issue 12): a request that makes an engine step fail, whether in the encoder,
the denoiser, the sampler or its own listener, fails alone; its batch-mates finish with exactly the seeded
text they give alone. Deadlines stop a request between steps and keep what it committed."""

from __future__ import annotations

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.errors import RequestError
from letterpress.sampling import GeneratorDraws, NonFiniteRows

from .reference import build_reference

PARAMS = [SamplingParams(max_new_tokens=40, seed=50 + i, max_denoising_steps=5) for i in range(4)]
POISONED = 2  # the row that fails: in the middle, so rows before it have drawn when its fault strikes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    build_reference(folder, canvas_length=16, weight_std=0.05, embed_std=0.5)
    return folder


@pytest.fixture(scope="module", params=["plain", "fast"])
def llm(folder, request):
    return LLM(folder, max_num_seqs=8, max_model_len=160, impl=request.param)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 512, (int(n),), generator=g).tolist() for n in (5, 17, 9, 30)]


@pytest.fixture(scope="module")
def alone(llm):
    """Each good request run by itself: what it must also give beside a failing one."""
    return {i: llm.generate(prompts()[i], PARAMS[i])[0].token_ids for i in range(4) if i != POISONED}


def run_batch(llm, draws=None, listeners=None):
    assert not llm.scheduler.has_work() and sorted(llm.scheduler.free_slots) == list(range(8))
    requests = [llm.make_request(p, PARAMS[i], draws=draws[i] if draws else None,
                                 listener=listeners[i] if listeners else None)
                for i, p in enumerate(prompts())]
    return requests, llm.run(requests)  # request i gets slot i


def assert_isolated(llm, outs, alone, message: str):
    bad = outs[POISONED]
    assert bad.finish_reason == "error" and message in str(bad.error), bad.error
    for i, out in enumerate(outs):
        if i != POISONED:
            assert out.finish_reason in ("stop", "length") and out.error is None
            assert out.token_ids == alone[i], f"row {i} changed"
    assert not llm.scheduler.has_work() and sorted(llm.scheduler.free_slots) == list(range(8))


def poison_slot(monkeypatch, llm, method: str, fault):
    """Wrap model.`method` so that `fault(output, row)` runs for the batch row that holds slot POISONED."""
    original = getattr(llm.model, method)

    def wrapped(ids, cache, slots, *args, **kwargs):
        hit = (slots == POISONED).nonzero().flatten().tolist()
        if hit and fault.__name__ == "raise_":
            fault(None, hit[0])
        out = original(ids, cache, slots, *args, **kwargs)
        for row in hit:
            fault(out, row)
        return out

    monkeypatch.setattr(llm.model, method, wrapped)


def raise_(out, row):
    raise RuntimeError("injected fault")


def nan_(out, row):
    out[row, 3, 7] = float("nan")


def test_nan_logits_fail_one_row(llm, alone, monkeypatch):
    poison_slot(monkeypatch, llm, "denoise", nan_)
    _, outs = run_batch(llm)
    assert isinstance(outs[POISONED].error, NonFiniteRows)
    assert_isolated(llm, outs, alone, "not finite")


def test_denoiser_that_raises_for_one_row(llm, alone, monkeypatch):
    poison_slot(monkeypatch, llm, "denoise", raise_)
    _, outs = run_batch(llm)
    assert_isolated(llm, outs, alone, "injected fault")


def test_encoder_that_raises_for_one_row(llm, alone, monkeypatch):
    poison_slot(monkeypatch, llm, "encode", raise_)
    _, outs = run_batch(llm)
    assert_isolated(llm, outs, alone, "injected fault")
    assert outs[POISONED].decoder_passes == 0


class FailingDraws(GeneratorDraws):
    """Draws that raise at the third step of the first canvas, after the rows before it have drawn."""

    def proposals(self, probs, canvas, step):
        if step == 2:
            raise ValueError("sampler fault")
        return super().proposals(probs, canvas, step)


def test_sampler_fault_does_not_shift_the_others_draws(llm, alone):
    draws = [GeneratorDraws(p.seed) for p in PARAMS]
    draws[POISONED] = FailingDraws(PARAMS[POISONED].seed)
    _, outs = run_batch(llm, draws=draws)
    assert_isolated(llm, outs, alone, "sampler fault")


def test_a_listener_that_raises_fails_its_own_row(llm, alone):
    def broken(event):
        raise KeyError("listener fault")

    _, outs = run_batch(llm, listeners=[None, None, broken, None])
    assert_isolated(llm, outs, alone, "listener fault")


def test_every_row_failing_leaves_the_engine_usable(llm, alone, monkeypatch):
    original = llm.model.denoise

    def always(*args, **kwargs):
        raise RuntimeError("broken model")

    monkeypatch.setattr(llm.model, "denoise", always)
    with pytest.raises(RuntimeError, match="broken model"):  # nothing to return: the error is raised
        run_batch(llm)
    assert not llm.scheduler.has_work() and sorted(llm.scheduler.free_slots) == list(range(8))
    monkeypatch.setattr(llm.model, "denoise", original)
    assert llm.generate(prompts()[0], PARAMS[0])[0].token_ids == alone[0]


def test_an_interrupted_call_leaves_nothing_for_the_next(llm, alone):
    """Ctrl-C in the middle of generate (here a listener raising KeyboardInterrupt mid-step): the call's rows are
    dropped, so the next call runs only its own request (and gives its seeded answer), not the abandoned batch."""
    events = []

    def interrupt(event):
        events.append(event)
        if len(events) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(llm, listeners=[None, interrupt, None, None])
    assert not llm.scheduler.has_work() and sorted(llm.scheduler.free_slots) == list(range(8))
    seen = len(events)
    assert llm.generate(prompts()[0], PARAMS[0])[0].token_ids == alone[0]
    assert len(events) == seen  # the abandoned row's listener is never called again


def test_calls_from_several_threads_run_one_after_another(llm, alone):
    import threading

    got, errors = {}, []

    def one(i):
        try:
            got[i] = llm.generate(prompts()[i], PARAMS[i])[0].token_ids
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in alone for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == alone


def test_a_listener_cannot_start_a_call_of_its_own(llm, alone):
    def nested(event):
        llm.generate(prompts()[0], PARAMS[0])

    _, outs = run_batch(llm, listeners=[None, None, nested, None])
    assert_isolated(llm, outs, alone, "already running a call in this thread")


# ------------------------------------------------------------------------------------------- deadlines
def test_deadlines(llm, alone):
    ps = prompts()
    # a request whose deadline passed while it waited never runs; its batch-mate is unaffected
    expired = llm.make_request(ps[1], PARAMS[1], timeout=1e-9)
    outs = llm.run([llm.make_request(ps[0], PARAMS[0]), expired])
    assert outs[1].finish_reason == "timeout" and outs[1].token_ids == [] and outs[1].decoder_passes == 0
    assert outs[0].token_ids == alone[0]
    # a running request stops at the step after its deadline with the canvases it committed
    long = SamplingParams(max_new_tokens=48, seed=5, max_denoising_steps=5, ignore_eos=True)
    full = llm.generate(ps[3], long)[0]
    requests = []

    def expire_after_first_canvas(event):
        if event.final:
            requests[0].deadline = 0.0

    requests.append(llm.make_request(ps[3], long, listener=expire_after_first_canvas))
    out = llm.run(requests)[0]
    assert out.finish_reason == "timeout" and out.token_ids == full.token_ids[:16] and out.canvases == 1
    assert sorted(llm.scheduler.free_slots) == list(range(8))
    assert llm.generate(ps[0], PARAMS[0], timeout=60)[0].token_ids == alone[0]
    with pytest.raises(RequestError, match="timeout"):
        llm.generate(ps[0], PARAMS[0], timeout=0)


def test_max_model_len_must_hold_a_canvas(folder):
    with pytest.raises(RequestError, match="cannot hold one canvas"):
        LLM(folder, max_model_len=16)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"max_num_seqs": -1}, "max_num_seqs must be a positive integer"),
    ({"prefill_chunk": 0}, "prefill_chunk must be a positive integer"),
    ({"prefill_chunk": -5}, "prefill_chunk must be a positive integer"),
    ({"max_model_len": "2048"}, "max_model_len must be a positive integer"),
    ({"max_model_len": 2048.0}, "max_model_len must be a positive integer"),
    ({"max_model_len": 10**6}, "positions this model was trained for"),
])
def test_engine_sizes_the_engine_cannot_use_are_refused(folder, kwargs, message):
    """Each of these used to construct and then fail every request (a reshape error, a misleading "raise
    --kv-cache-memory"), or, past the model's positions, answer with noise."""
    from letterpress.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        LLM(folder, **kwargs)


def test_a_prompt_too_long_for_the_model_is_not_told_to_raise_max_model_len_past_its_positions(folder):
    llm = LLM(folder, max_model_len=160)
    limit = llm.model.text_config.max_position_embeddings
    with pytest.raises(RequestError, match="exceeds max_model_len") as e:
        llm.generate(list(range(3, 3 + limit)), SamplingParams(max_new_tokens=16))
    assert "raise max_model_len" not in str(e.value)
    with pytest.raises(RequestError, match=r"raise max_model_len \(--max-model-len\) to at least 176"):
        llm.generate(list(range(3, 163)), SamplingParams(max_new_tokens=16))
