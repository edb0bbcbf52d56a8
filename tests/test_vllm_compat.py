"""What a client written for `vllm serve` meets (README, "vLLM compatibility"): /tokenize, /detokenize,
/version, CORS, X-Request-Id, --chat-template, top_k, stop_token_ids, skip_special_tokens and vllm_xargs; real
HTTP clients (httpx, the openai package) against a real server on loopback serving the embedded model. Also:
a client that leaves before its stream starts frees its rows and its place among the open jobs."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from letterpress import LLM, SamplingParams, __version__  # noqa: E402
from letterpress.embedded import default_model_dir  # noqa: E402
from letterpress.errors import CheckpointError  # noqa: E402
from letterpress.fast_sampling import fused_denoise_step  # noqa: E402
from letterpress.sampling import GeneratorDraws, denoise_step  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402
from letterpress.tokenizer import Tokenizer, load_chat_template  # noqa: E402

from .live_server import DEADLINE_S, KEY, MODEL, LiveServer  # noqa: E402

PROMPT = "def add(a, b):"
ORIGIN = "http://localhost:3000"
STEPS = 4  # denoising steps per canvas in these requests: fast, and the baselines below use the same
CEILING = 8  # --max-denoising-steps
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two numbers."}]


@pytest.fixture(scope="module")
def server():
    llm = LLM(None, max_num_seqs=8, max_model_len=512, prefill_chunk=64)
    llm.defaults.max_denoising_steps = STEPS
    # What the engine writes for PROMPT at seed 0 (the server's temperature 1 is this schedule), computed before
    # the engine thread owns the LLM: the stop_token_ids and skip_special_tokens tests read it.
    params = dict(max_new_tokens=64, seed=0, max_denoising_steps=STEPS)
    baseline = llm.generate([llm.tokenize(PROMPT)], SamplingParams(**params))[0]
    with_eos = llm.generate([llm.tokenize(PROMPT)], SamplingParams(**params, ignore_eos=True))[0]
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY, max_denoising_steps=CEILING,
                                        allowed_origins=[ORIGIN], enable_request_id_headers=True))
    live.baseline, live.with_eos = baseline, with_eos
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=DEADLINE_S) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def assert_error(r, status: int, text: str, param: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"], error
    if param is not None:
        assert error["param"] == param


# ------------------------------------------------------------------------------- /tokenize, /detokenize, /version
def test_version(http):
    r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": __version__}


def test_tokenize_a_prompt_as_completions_would(http, server):
    tok = server.server_state.llm.tokenizer
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})
    ids = server.server_state.llm.tokenize(PROMPT)
    assert r.status_code == 200
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    assert ids[0] == tok.bos_id  # add_special_tokens defaults to true, as in vLLM: the BOS /v1/completions adds
    bare = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == ids[1:] and bare["token_strs"] == [tok.id_to_token(i) for i in ids[1:]]
    # /detokenize is the inverse, special tokens kept (vLLM decodes with the tokenizer's defaults)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids, skip_special_tokens=False)}
    assert tok.decode(ids, skip_special_tokens=False).endswith(PROMPT)


def test_tokenize_messages_counts_what_chat_completions_encodes(http, client):
    r = http.post("/tokenize", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 200
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, seed=0)
    assert r.json()["count"] == len(r.json()["tokens"]) == reply.usage.prompt_tokens
    no_prompt = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < r.json()["count"] and r.json()["tokens"][:no_prompt["count"]] == no_prompt["tokens"]


@pytest.mark.parametrize("path,body,status,text,param", [
    ("/tokenize", {"prompt": PROMPT, "model": "other"}, 404, "does not exist", "model"),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ 1 }}"}, 400, "--chat-template", "chat_template"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "not supported", "continue_final_message"),
    ("/tokenize", {"prompt": PROMPT, "logprobs": 1}, 400, "not a parameter", "logprobs"),
    ("/tokenize", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, 400, "may not set", "chat_template_kwargs"),
    ("/detokenize", {"tokens": [5, 10**6]}, 400, "not in the vocabulary", "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "tokens"),
])
def test_tokenizer_route_errors(http, path, body, status, text, param):
    assert_error(http.post(path, json=body), status, text, param)


def test_tokenizer_routes_need_the_key(server):
    # vLLM leaves /tokenize and /detokenize open; they cost CPU, so we guard them like /v1 (README)
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(server.url + path, json=body).status_code == 401
    assert httpx.get(server.url + "/version").status_code == 200


# ---------------------------------------------------------------------------------------- headers: id, CORS
def test_x_request_id_names_the_response_and_is_echoed(http):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "seed": 0}
    r = http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "chatcmpl-trace-42"
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True},
                     headers={"X-Request-Id": "trace-43"}) as s:
        assert s.headers["x-request-id"] == "trace-43"
        ids = {line[6:].split('"id":"', 1)[1].split('"', 1)[0] for line in s.iter_lines()
               if line.startswith("data: {")}
    assert ids == {"cmpl-trace-43"}
    # two requests with the same id at once: the rows keep unique engine ids, both answer
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(2) as pool:
        rs = list(pool.map(lambda _: http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8},
                                               headers={"X-Request-Id": "same"}), range(2)))
    assert [r.status_code for r in rs] == [200, 200] and {r.json()["id"] for r in rs} == {"cmpl-same"}
    # --enable-request-id-headers: a request without one gets a fresh id; errors carry it too
    fresh = http.get("/v1/models").headers["x-request-id"]
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    assert httpx.get(http.base_url.join("/v1/models"), headers={"X-Request-Id": "e1"}).headers["x-request-id"] == "e1"
    assert_error(http.post("/v1/completions", json={"prompt": PROMPT}, headers={"X-Request-Id": "x" * 300}), 400,
                 "X-Request-Id")


def test_cors_preflight_and_responses(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200  # no API key needed for a preflight
    assert r.headers["access-control-allow-origin"] == ORIGIN and "POST" in r.headers["access-control-allow-methods"]
    # a 401 carries the CORS header too, so the browser lets the page read the error
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # another origin gets no CORS header (the browser blocks it); its preflight is refused
    other = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers
    assert httpx.options(server.url + "/v1/models", headers={**preflight, "Origin": "http://evil.example"}).status_code == 400


# ---------------------------------------------------------------------------------------------- sampling fields
def test_stop_token_ids_end_the_choice_like_eos(client, server):
    tokens = server.baseline.token_ids  # what the model writes at seed 0 (it stopped at EOS after these)
    stop = tokens[3]
    first = tokens.index(stop)
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=64, seed=0)
    plain = client.completions.create(**kwargs)
    assert plain.usage.completion_tokens == len(tokens)
    cut = client.completions.create(**kwargs, extra_body={"stop_token_ids": [stop]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == first
    tok = server.server_state.llm.tokenizer
    assert cut.choices[0].text == tok.decode(tokens[:first])
    for extra, text in (({"stop_token_ids": [10**7]}, "not in the vocabulary"),
                        ({"stop_token_ids": [stop], "ignore_eos": True}, "ignore_eos"),
                        ({"stop_token_ids": [stop], "suffix": "\n    return x\n"}, "apply to infilling"),
                        ({"skip_special_tokens": False, "suffix": "\n    return x\n"}, "apply to infilling")):
        with pytest.raises(openai.BadRequestError, match=text):
            client.completions.create(**kwargs, extra_body=extra)


def test_skip_special_tokens(client, server):
    tok = server.server_state.llm.tokenizer
    ids = server.with_eos.token_ids  # ignore_eos: the EOS tokens stay in the output
    eos = tok.id_to_token(tok.eos_id)
    assert tok.eos_id in ids
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=64, seed=0)
    default = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text
    kept = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0].text
    assert default == tok.decode(ids) and eos not in default
    assert kept == tok.decode(ids, skip_special_tokens=False) and eos in kept


def test_top_k_is_accepted_and_checked(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=16, seed=3)
    free = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs, extra_body={"top_k": 0}).choices[0].text == free
    assert client.completions.create(**kwargs, extra_body={"top_k": -1}).choices[0].text == free  # vLLM's old "off"
    assert client.completions.create(**kwargs, extra_body={"top_k": 1}).choices[0].text != free
    # greedy ignores top_k, as vLLM resets it at temperature 0
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=0, extra_body={"top_k": 2}).choices[0].text == greedy
    with pytest.raises(openai.BadRequestError, match="top_k must be 0"):
        client.completions.create(**kwargs, extra_body={"top_k": -2})
    # the constraint of structured output chooses among every allowed token: no top_k, no extra stop ids
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    with pytest.raises(openai.BadRequestError, match="cannot be combined with top_k"):
        client.completions.create(**kwargs, extra_body={**choice, "top_k": 5})
    with pytest.raises(openai.BadRequestError, match="stop_token_ids cannot be combined"):
        client.completions.create(**kwargs, extra_body={**choice, "stop_token_ids": [7]})


def test_vllm_xargs_diffusion_options(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, seed=0)
    one = client.completions.create(**kwargs, extra_body={"vllm_xargs": {"diffusion_max_steps": 1}})
    assert one.model_dump()["usage"]["letterpress"]["steps_per_canvas"] == [[1]]
    ours = client.completions.create(**kwargs, extra_body={"max_denoising_steps": 1})
    assert ours.choices[0].text == one.choices[0].text
    # vLLM caps diffusion_max_steps at the served maximum; we cap at --max-denoising-steps
    capped = client.completions.create(**kwargs, extra_body={"vllm_xargs": {"diffusion_max_steps": 10**6}})
    assert max(capped.model_dump()["usage"]["letterpress"]["steps_per_canvas"][0]) <= CEILING
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):  # our own field: refused
        client.completions.create(**kwargs, extra_body={"max_denoising_steps": CEILING + 1})
    for xargs, text in (({"diffusion_max_steps": 0}, "positive integer"),
                        ({"diffusion_seed_canvas": [1, 2]}, "seeded canvas is not supported"),
                        ({"diffusion_canvas_length": 8}, "whole canvases"),
                        ({"session_id": "a"}, "not an option letterpress knows")):
        with pytest.raises(openai.BadRequestError, match=text):
            client.completions.create(**kwargs, extra_body={"vllm_xargs": xargs})
    with pytest.raises(openai.BadRequestError, match="disagree"):
        client.completions.create(**kwargs, extra_body={"max_denoising_steps": 2, "vllm_xargs": {"diffusion_max_steps": 1}})


def test_top_k_filters_proposals_and_both_samplers_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 32, 300, generator=g) * torch.linspace(0.5, 25, 32)[None, :, None]
    temps, bounds = torch.tensor([0.8, 0.55, 0.41]), torch.tensor([0.1, 1.0, 5.0])
    args = dict(canvas_index=[0, 2, 1], step_index=[0, 7, 3], top_k=[5, 0, 40])
    plain = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], **args)
    fused = fused_denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)],
                               sc_dtype=torch.float32, **args)
    for name in ("next_canvas", "argmax", "accept_mask", "mean_entropy", "processed_logits"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    top5 = logits[0].topk(5, -1).indices
    accepted = plain.accept_mask[0]
    assert accepted.any() and all(int(t) in top5[i] for i, t in enumerate(plain.next_canvas[0]) if accepted[i])
    assert torch.equal(plain.argmax, logits.argmax(-1))  # the top-1 token is never filtered
    # row 1 (no filter) is exactly the unfiltered step's row
    free = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s) for s in (1, 2, 3)], **{**args, "top_k": None})
    assert torch.equal(free.next_canvas[1], plain.next_canvas[1]) and torch.equal(free.mean_entropy[1], plain.mean_entropy[1])
    assert torch.isfinite(plain.mean_entropy).all() and plain.mean_entropy[0] < free.mean_entropy[0]


def test_top_k_same_tokens_on_the_plain_and_fast_paths():
    params = SamplingParams(max_new_tokens=40, seed=5, max_denoising_steps=6, top_k=3)
    outs = [LLM(None, max_num_seqs=2, max_model_len=256, impl=impl).generate([PROMPT], params)[0].token_ids
            for impl in ("plain", "fast")]
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------------------ --chat-template
def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ bos_token }}x") == "{{ bos_token }}x"  # not a file: the template itself
    with pytest.raises(CheckpointError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    tok = Tokenizer.from_dir(default_model_dir())
    tok.set_chat_template(load_chat_template(str(path)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]) == "[hi]"
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        tok.set_chat_template("{% for %}")


def test_chat_cli_takes_a_chat_template(tmp_path, monkeypatch, capsys):
    import io

    from letterpress.cli import main

    template = tmp_path / "qa.jinja"
    template.write_text("{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:")
    rendered = []
    real = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template", lambda self, *a, **k: rendered.append(real(self, *a, **k))
                        or rendered[-1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--chat-template", str(template), "--max-new-tokens", "4", "--max-denoising-steps", "1",
                 "--seed", "0"]) == 0
    assert len(rendered) == 1 and rendered[0].endswith("Q: hello\nA:")


def test_serve_refuses_a_mistyped_chat_template_path_before_loading(capsys):
    from letterpress.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "--port", str(port), "--chat-template", "templates/nope.jinja"]) == 2
    err = capsys.readouterr().err.strip()
    assert "looks like a file path" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------- a client that leaves early
def test_client_gone_before_the_stream_starts_frees_its_job(server, http):
    """A server speaking ASGI 2.4 (uvicorn says 2.3 today) raises OSError from the first `send` when the client
    has gone; starlette then never starts the SSE generator, so the generator's own `finally` cannot free the
    job. Driven here through the app itself, on the server's event loop, with such a `send`."""
    state = server.server_state
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True,
                       "max_denoising_steps": CEILING, "seed": 1}).encode()
    sent: list[dict] = []

    async def call():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                raise OSError("the client is gone")

        headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode()),
                   (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 9),
                 "server": ("127.0.0.1", 80)}
        await server.app(scope, receive, send)

    asyncio.run_coroutine_threadsafe(call(), state.loop).result(DEADLINE_S)
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200]
    deadline = time.monotonic() + DEADLINE_S
    while state.open_jobs or state.engine.scheduler.num_running or state.engine.scheduler.num_waiting:
        assert time.monotonic() < deadline, f"{len(state.open_jobs)} job(s) still open"
        time.sleep(0.1)
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).status_code == 200
