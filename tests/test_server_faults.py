"""Issue 12 through a real server and the `openai` client: a request that breaks an engine step fails alone
(its batch-mates get their seeded text), numeric fields the engine cannot honour are a 400, requests cannot
exceed the `--max-denoising-steps` ceiling, and a request past its deadline gets a 504 (streams: a final
error event, then [DONE]) and frees its rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from letterpress import LLM  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402

from .live_server import DEADLINE_S, KEY, MODEL, LiveServer  # noqa: E402
from .test_server import assert_error, eventually, metric, sse_events  # noqa: E402

GOOD = [("def add(a, b):", 11), ("import sys\n", 12), ("class Node:", 13)]  # (prompt, seed)
POISON = "# this prompt's row gets nan logits"
CEILING = 16


@pytest.fixture(scope="module")
def server():
    llm = LLM(None, max_num_seqs=8, max_model_len=1024)
    llm.defaults.max_denoising_steps = 3  # fast by default; requests may ask for up to CEILING
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY, max_queue=16,
                                        max_denoising_steps=CEILING))
    yield live
    live.stop()


def good_request(client, prompt: str, seed: int) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, seed=seed).choices[0].text


def poison(monkeypatch, server, fault: str, rows_expected: int) -> None:
    """Make the model fail for the row whose prompt is POISON (nan logits, or an exception when the row is
    in the batch). The first call waits until `rows_expected` rows were submitted, so that they all share
    the engine's batches from the next step on."""
    llm = server.server_state.llm
    engine = server.server_state.engine
    bad_ids = llm.tokenize(POISON)
    original = llm.model.denoise
    gate = threading.Event()

    def denoise(canvas, cache, slots, *args, **kwargs):
        if not gate.is_set():
            deadline = time.monotonic() + DEADLINE_S
            while engine._rows_in_flight < rows_expected and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
        bad = {r.slot for r in engine.scheduler.running if r.request.prompt_token_ids == bad_ids}
        hit = [i for i, s in enumerate(slots.tolist()) if s in bad]
        if hit and fault == "raise":
            raise RuntimeError("injected fault")
        out = original(canvas, cache, slots, *args, **kwargs)
        for i in hit:
            out[i, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(llm.model, "denoise", denoise)


@pytest.mark.parametrize("fault", ["nan", "raise"])
def test_a_poisoned_request_fails_alone(server, client, http, monkeypatch, fault):
    alone = [good_request(client, p, s) for p, s in GOOD]
    poison(monkeypatch, server, fault, rows_expected=4)

    def poisoned():
        if fault == "nan":  # non-streaming: a 500 in OpenAI's error shape
            return http.post("/v1/completions", json={"prompt": POISON, "max_tokens": 100, "seed": 1})
        body = {"prompt": POISON, "max_tokens": 100, "seed": 1, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:  # streaming: an in-band error, then [DONE]
            return r.status_code, sse_events(r)

    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(poisoned)
        good = [pool.submit(good_request, client, p, s) for p, s in GOOD]
        texts = [f.result() for f in good]
        bad = bad.result()
    assert texts == alone
    if fault == "nan":
        assert_error(bad, 500, "not finite")
    else:
        status, events = bad
        assert status == 200 and events[-1] == ("message", "[DONE]")
        error = events[-2][1]["error"]
        assert error["type"] == "server_error" and "injected fault" in error["message"]
    monkeypatch.undo()
    eventually(lambda: metric(http, "letterpress_running_rows") == 0)
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------- validation
BAD = [
    # the inputs that made whole batches fail
    ({"t_min": 0, "t_max": 1e-50}, "t_max", None),
    ({"max_denoising_steps": 3000000000}, "limit of 16", "max_denoising_steps"),
    ({"max_denoising_steps": CEILING + 1}, "--max-denoising-steps", "max_denoising_steps"),
    ({"t_min": 50, "t_max": 1000}, "t_max", None),
    ({"t_min": 0.5, "t_max": 0.4}, "t_min <= t_max", None),
    ({"entropy_bound": 0}, None, "entropy_bound"),
    ({"seed": 2**63}, None, "seed"),
    ({"temperature": 2.5}, None, "temperature"),
]


@pytest.mark.parametrize("fields,text,param", BAD, ids=[",".join(b[0]) for b in BAD])
def test_numbers_the_engine_cannot_honour_are_400(http, fields, text, param):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, **fields})
    assert_error(r, 400, text, param)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "t_min", "t_max", "entropy_bound"])
def test_non_json_numbers_are_400(http, field, literal):
    raw = '{"prompt": "x", "max_tokens": 4, "%s": %s}' % (field, literal)
    r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, None, field)


def test_tiny_temperatures_are_greedy(client):
    """Below 1e-5 (vLLM's threshold) a temperature is greedy: no underflowing schedule, no nan."""
    def text(t):
        return client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=16, temperature=t).choices[0].text

    assert text(1e-38) == text(0)


def test_the_step_ceiling_is_allowed(client):
    resp = client.completions.create(model=MODEL, prompt="x", max_tokens=4, seed=0,
                                     extra_body={"max_denoising_steps": CEILING, "entropy_bound": 1e-9})
    assert all(s <= CEILING for s in resp.model_dump()["usage"]["letterpress"]["steps_per_canvas"][0])
    default = client.completions.create(model=MODEL, prompt="x", max_tokens=4, seed=0)
    assert max(default.model_dump()["usage"]["letterpress"]["steps_per_canvas"][0]) <= 3  # the default, capped


def test_the_ceiling_caps_the_default(server):
    from letterpress.server.app import OpenAIServer, ServerConfig
    from letterpress.server.schemas import ApiError, CompletionRequest

    llm = server.server_state.llm  # its default is 3 steps (see the fixture)
    capped = OpenAIServer(llm, ServerConfig(served_model_names=[MODEL], max_denoising_steps=2))
    assert (capped.step_ceiling, capped.default_steps) == (2, 2)
    assert capped.sampling_params(CompletionRequest(prompt="x"), 4, 0).max_denoising_steps == 2
    with pytest.raises(ApiError, match="limit of 2"):
        capped.sampling_params(CompletionRequest(prompt="x", max_denoising_steps=3), 4, 0)
    unset = OpenAIServer(llm, ServerConfig(served_model_names=[MODEL]))
    assert (unset.step_ceiling, unset.default_steps) == (1024, 3)


# ------------------------------------------------------------------------------------------- deadlines
def test_request_timeout(server, http, client, monkeypatch):
    monkeypatch.setattr(server.server_state.engine, "request_timeout", 0.5)
    long = {"prompt": "def f(x):", "max_tokens": 900, "seed": 0, "ignore_eos": True, "max_denoising_steps": CEILING}
    r = http.post("/v1/completions", json=long)
    assert_error(r, 504, "--request-timeout")
    assert r.json()["error"]["code"] == "request_timeout"
    with pytest.raises(openai.APIStatusError) as error:  # what the openai client sees (max_retries=0)
        client.completions.create(model=MODEL, prompt=long["prompt"], max_tokens=900, seed=0,
                                  extra_body={"ignore_eos": True, "max_denoising_steps": CEILING})
    assert error.value.status_code == 504
    with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as s:
        assert s.status_code == 200
        events = sse_events(s)
    assert events[-1] == ("message", "[DONE]")
    assert events[-2][1]["error"]["code"] == "request_timeout"
    eventually(lambda: metric(http, "letterpress_running_rows") == 0)
    assert metric(http, 'letterpress_finished_rows_total{reason="timeout"}') >= 3
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=4).choices[0].finish_reason
