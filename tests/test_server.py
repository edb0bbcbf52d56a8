"""`letterpress serve` end to end: the real `openai` client (and raw httpx for SSE) against a real uvicorn server
on 127.0.0.1 serving the embedded default model. Its text is not the point (a tiny model, or random weights); we test
shapes, token counts, seeds, streaming, errors, batching and disconnects. Never timing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from letterpress import LLM  # noqa: E402
from letterpress.embedded import default_model_dir  # noqa: E402
from letterpress.sampling import GeneratorDraws, denoise_step  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402
from letterpress.server.text import ChoiceText  # noqa: E402

from .live_server import DEADLINE_S, KEY, MODEL, LiveServer, wait_healthy  # noqa: E402

PROMPT = "def fibonacci(n):"
CANVAS = json.loads((default_model_dir() / "config.json").read_text())["canvas_length"]
TWO_CANVASES = CANVAS + CANVAS // 2  # max_tokens that take two canvases
CHAT = [{"role": "user", "content": "Write a haiku about tests."}]


@pytest.fixture(scope="module")
def server():
    # 3 denoising steps per canvas by default keeps the whole file fast on 2 CPU cores; requests may ask for
    # up to 48 (the server's ceiling)
    llm = LLM(None, max_num_seqs=32, max_model_len=1024, prefill_chunk=64)
    llm.defaults.max_denoising_steps = 3
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL, "tiny"], api_key=KEY, max_queue=64,
                                        max_denoising_steps=48))
    yield live
    live.stop()


def eventually(condition, what: str = "condition") -> None:
    """Poll until `condition()` holds; the deadline only guards against hanging, it is not a timing test."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.2)


def extra(obj) -> dict:
    """The whole response as a dict, including our extensions (which the openai models keep as extras)."""
    return obj.model_dump()


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sse_events(response) -> list[tuple[str, object]]:
    """Parse a raw SSE body into (event name, data) pairs; data is JSON, or the string '[DONE]'."""
    events, name, data = [], "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                payload = "\n".join(data)
                events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


# ------------------------------------------------------------------------------------------- basics
def test_health_models_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert "letterpress_running_rows" in httpx.get(server.url + "/metrics").text


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion(client, server):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=1, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert resp.object == "text_completion" and isinstance(choice.text, str) and choice.finish_reason == "length"
    prompt_ids = server.server_state.llm.tokenize(PROMPT)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), 8)
    assert resp.usage.total_tokens == len(prompt_ids) + 8
    stats = extra(resp)["usage"]["letterpress"]
    assert stats["canvases"] == 1 and stats["denoising_steps"] == sum(stats["steps_per_canvas"][0]) >= 1
    assert stats["tokens_per_forward"] > 0
    # the same prompt as token ids gives the same text
    again = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=8, seed=1,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_chat(client, server):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12, seed=2)
    message = resp.choices[0].message
    assert resp.object == "chat.completion" and resp.model == "tiny" and message.role == "assistant"
    assert isinstance(message.content, str) and resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(server.server_state.llm.tokenizer.encode_chat(CHAT))
    assert resp.usage.completion_tokens <= 12


def test_prompt_batches_and_empty_text_prompt(client, server):
    ids = server.server_state.llm.tokenize(PROMPT)
    resp = client.completions.create(model=MODEL, prompt=[ids, [2, 100, 200]], max_tokens=4, seed=1, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model=MODEL, prompt=[2, 100, 200], max_tokens=4, seed=2)
    assert resp.choices[3].text == alone.choices[0].text  # prompt 1, choice 1: seed + 1
    assert resp.usage.prompt_tokens == len(ids) + 3
    assert client.completions.create(model=MODEL, prompt="", max_tokens=4).usage.prompt_tokens == 1  # just BOS


def test_model_is_optional(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "seed": 0})
    assert r.status_code == 200 and r.json()["model"] == MODEL


NULLABLE = ["n", "stream", "stream_options", "max_tokens", "temperature", "seed", "stop", "user", "top_p",
            "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "structured_outputs"]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_null_fields_mean_their_defaults(http, endpoint):
    """OpenAI's spec lets every optional field be null (`n` and `stream` too: 1 and false, as in vLLM)."""
    path, body = (("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": None}) if endpoint == "chat"
                  else ("/v1/completions", {"prompt": PROMPT, "logprobs": None, "echo": None, "best_of": None}))
    r = http.post(path, json={"model": MODEL, **body, **dict.fromkeys(NULLABLE)})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.headers["content-type"].startswith("application/json")
    if endpoint == "chat":  # chat's logprobs is a switch: false is off
        assert http.post(path, json={"model": MODEL, **body, "logprobs": False, "max_tokens": 4}).status_code == 200


# ------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_stream_equals_non_stream(client, endpoint):
    # two canvases, so the stream has two content chunks
    args = dict(model=MODEL, max_tokens=TWO_CANVASES, seed=3, extra_body={"ignore_eos": True})
    if endpoint == "chat":
        create, args["messages"] = client.chat.completions.create, CHAT
        piece = lambda c: c.choices[0].delta.content or ""  # noqa: E731
        whole = lambda r: r.choices[0].message.content  # noqa: E731
    else:
        create, args["prompt"] = client.completions.create, PROMPT
        piece = lambda c: c.choices[0].text  # noqa: E731
        whole = lambda r: r.choices[0].text  # noqa: E731
    full = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(piece(c) for c in chunks if c.choices)
    assert text == whole(full)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    # at most one content chunk per canvas (a canvas that decodes to no text, e.g. all EOS under ignore_eos,
    # sends none)
    assert 1 <= sum(1 for c in chunks if c.choices and piece(c)) <= 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert extra(chunks[-1].usage)["letterpress"]["canvases"] == 2


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=3, stream=True))
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_denoising_preview_events(http, client):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": TWO_CANVASES, "seed": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"denoising_preview": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == ("message", "[DONE]")
    previews = [data["denoising_preview"] for name, data in events if name == "denoising_preview"]
    assert previews and {p["canvas"] for p in previews} == {0, 1}
    for canvas in (0, 1):
        steps = [p["step"] for p in previews if p["canvas"] == canvas]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 3
    # every preview is also an empty chunk, so standard clients see no content in it
    assert all(data["choices"][0]["delta"] == {} for name, data in events if name == "denoising_preview")
    content = "".join(d["choices"][0]["delta"].get("content") or "" for n, d in events[:-1] if n == "message")
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=TWO_CANVASES, seed=4,
                                           extra_body={"ignore_eos": True})
    assert content == plain.choices[0].message.content
    # the last draft of each canvas is what the canvas committed
    last = {p["canvas"]: p for p in previews}
    assert sum(len(p["token_ids"]) for p in last.values()) == plain.usage.completion_tokens
    # the openai package, asked for previews, still yields the same text
    chunks = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=TWO_CANVASES, seed=4, stream=True,
                                            stream_options={"denoising_preview": True}, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content


# ------------------------------------------------------------------------------------------- sampling
def test_n_choices_use_consecutive_seeds(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=10, n=3,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 24
    for j in (0, 2):
        alone = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=10 + j,
                                          extra_body={"ignore_eos": True})
        assert alone.choices[0].text == resp.choices[j].text
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, seed=10, n=2, stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 2


def test_stop_strings(client):
    long = dict(model=MODEL, prompt=PROMPT, max_tokens=120, seed=5, extra_body={"ignore_eos": True})
    base = client.completions.create(**long).choices[0].text
    # a stop string from the second canvas: the first three characters not seen earlier in the text
    k = next(i for i in range(len(base) // 2, len(base) - 3) if base.find(base[i:i + 3]) == i)
    stop = base[k:k + 3]
    resp = client.completions.create(**long, stop=[stop, "\x00never"])
    assert resp.choices[0].text == base[:k] and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < 120
    chunks = list(client.completions.create(**long, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == base[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_holds_back_a_stop_prefix_before_a_split_character(http):
    """The first canvas ends inside 京 (U+FFFD for now), and "東" is the start of the stop string: the stream
    must not send it, as the non-streamed answer cuts it (the forced text puts the boundary there)."""
    body = {"model": MODEL, "prompt": "Say it:", "max_tokens": 80, "temperature": 0, "stop": ["東京 🎉"],
            "structured_outputs": {"regex": r"(xy\ ){20}東京\ 🎉\ end"}}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"] == "xy " * 20 and whole["finish_reason"] == "stop"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [data["choices"][0] for name, data in sse_events(r) if data != "[DONE]"]
    assert "".join(c["text"] for c in chunks) == whole["text"] and chunks[-1]["finish_reason"] == "stop"


def test_temperature_zero_is_deterministic(client):
    def greedy(**kw):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, **kw).choices[0].text

    assert greedy() == greedy() == greedy(seed=0)


def test_temperature_scales_the_schedule(client, server):
    d = server.server_state.llm.defaults
    scaled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, seed=6, temperature=0.5)
    explicit = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, seed=6,
                                         extra_body={"t_min": d.t_min * 0.5, "t_max": d.t_max * 0.5})
    assert scaled.choices[0].text == explicit.choices[0].text


def test_sampler_extensions(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=7,
                                     extra_body={"max_denoising_steps": 1, "entropy_bound": 0.5})
    assert extra(resp)["usage"]["letterpress"]["steps_per_canvas"] == [[1]]


def test_greedy_proposals_are_the_argmax():
    """The sampler's greedy path: argmax proposals; non-greedy rows draw exactly as before."""
    logits = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(0))
    temps, bounds = torch.tensor([0.5, 0.5]), torch.tensor([1e9, 1e9])  # accept every position

    def run(greedy):
        draws = [GeneratorDraws(1), GeneratorDraws(2)]
        return denoise_step(logits, temps, bounds, draws, [0, 0], [0, 0], greedy)

    plain, mixed = run(None), run([True, False])
    assert torch.equal(mixed.next_canvas[0], logits[0].argmax(-1))
    assert torch.equal(mixed.next_canvas[1], plain.next_canvas[1])
    assert not torch.equal(plain.next_canvas[0], logits[0].argmax(-1))
    assert torch.equal(run([False, False]).next_canvas, plain.next_canvas)


def test_choice_text_holds_back_split_characters_and_stop_prefixes():
    pieces = {1: "ab", 2: "\ufffd", 3: "é", 4: "cd"}  # 2 then 3: a character split across canvases

    def decode(ids):
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    t = ChoiceText(decode, ["dX"])
    assert t.add_canvas([1, 2]) == "ab"  # the trailing U+FFFD waits
    assert t.add_canvas([3, 4]) == "éc"  # "d" could start the stop string "dX"
    assert t.finish([1, 2, 3, 4]) == "d" and t.text == "abécd" and not t.stopped


def test_choice_text_streams_what_the_whole_text_keeps_at_every_cut():
    """A canvas that ends inside a multi-byte character of a stop string: the stop prefix before the U+FFFD
    tail is held back too. Byte tokens, cut into canvases at every pair of points: the deltas add up to the
    non-streamed text."""
    ids = list("xy xy xy 東京 🎉 end".encode())

    def decode(token_ids):
        return bytes(token_ids).decode("utf-8", errors="replace")

    for stops in (["東京 🎉"], ["🎉"], ["x", "東京 🎉 e"], ["京 🎉 end!"], []):
        whole = ChoiceText(decode, stops)
        expected = whole.add_canvas(ids) + whole.finish(ids)
        assert expected == whole.text
        for i in range(len(ids) + 1):
            for j in range(i, len(ids) + 1):
                t = ChoiceText(decode, stops)
                sent = [t.add_canvas(part) for part in (ids[:i], ids[i:j], ids[j:]) if not t.stopped]
                assert "".join(sent) + t.finish(ids) == expected, (stops, i, j, sent)
                assert "\ufffd" not in "".join(sent)


# ------------------------------------------------------------------------------------------- batching
def test_32_concurrent_requests_equal_their_solo_runs(client):
    prompts = [PROMPT, "import os\n", "class Stack:"]
    jobs = [dict(prompt=prompts[i % 3], max_tokens=(8, 20, 70)[i % 3] if i % 4 else 12, seed=100 + i)
            for i in range(32)]

    def run(job):
        resp = client.completions.create(model=MODEL, **job)
        steps = extra(resp)["usage"]["letterpress"]["steps_per_canvas"]
        return resp.choices[0].text, resp.usage.completion_tokens, steps

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, jobs))
    alone = [run(job) for job in jobs]
    assert together == alone


# ------------------------------------------------------------------------------------------- disconnects
def test_disconnected_clients_free_their_rows(http, client):
    aborted = metric(http, 'letterpress_finished_rows_total{reason="abort"}')
    # a long streaming request (15 canvases x up to 48 steps): drop it after its first draft
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "seed": 8, "stream": True, "max_denoising_steps": 48,
            "ignore_eos": True, "stream_options": {"denoising_preview": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("event: denoising_preview"):
                break
    # a long non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={**body, "stream": False, "stream_options": None}, timeout=1.0)
    eventually(lambda: metric(http, 'letterpress_finished_rows_total{reason="abort"}') >= aborted + 2)
    eventually(lambda: metric(http, "letterpress_running_rows") == 0)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, seed=0).choices[0].text is not None


# ------------------------------------------------------------------------------------------- errors
def assert_error(r, status: int, text: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    if text is not None:
        assert text in error["message"]
    if param is not None:
        assert error["param"] == param


LONG = "x " * 2000
ERRORS = [
    # (endpoint, body, status, part of the message, param)
    ("chat", {"messages": CHAT, "max_tokens": "8"}, 400, "valid integer", "max_tokens"),
    ("chat", {"messages": CHAT, "temperature": 3}, 400, None, "temperature"),
    ("chat", {"messages": CHAT, "n": 0}, 400, None, "n"),
    ("chat", {"messages": CHAT, "stream": "yes"}, 400, None, "stream"),
    ("chat", {"messages": "hello"}, 400, None, "messages"),
    ("chat", {"messages": CHAT, "frobnicate": 1}, 400, "frobnicate", "frobnicate"),
    ("chat", {"messages": CHAT, "model": "gpt-4"}, 404, "gpt-4", "model"),
    ("chat", {"messages": []}, 400, "non-empty", "messages"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "content", "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "not a chat role", "messages"),
    ("chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": 5}}]}, 400, "name a string",
     "tools"),
    ("chat", {"messages": CHAT, "max_tokens": 0}, 400, None, "max_tokens"),
    ("chat", {"messages": CHAT, "max_completion_tokens": -1}, 400, None, "max_completion_tokens"),
    ("completion", {"prompt": PROMPT, "max_tokens": 0}, 400, None, "max_tokens"),
    ("completion", {"prompt": LONG}, 400, "max_model_len", "prompt"),
    ("completion", {"prompt": PROMPT, "max_tokens": 5000}, 400, "max_model_len", "max_tokens"),
    ("chat", {"messages": CHAT, "max_completion_tokens": 5000}, 400, "max_model_len", "max_completion_tokens"),
    ("completion", {"prompt": []}, 400, "empty", "prompt"),
    ("completion", {"prompt": [1, "a"]}, 400, "list of token ids", "prompt"),
    ("completion", {"prompt": [10**9]}, 400, "token ids", "prompt"),
    ("completion", {"prompt": PROMPT, "max_tokens": 2, "structured_outputs": {"choice": ["a long answer here"]}}, 400,
     "too few", "max_tokens"),
    ("chat", {"messages": CHAT, "max_completion_tokens": 2, "structured_outputs": {"choice": ["a long answer here"]}},
     400, "max_completion_tokens 2 is too few", "max_completion_tokens"),
    ("completion", {"prompt": PROMPT, "structured_outputs": {"regex": "(unclosed"}}, 400, "the regex is not valid",
     "structured_outputs"),
    ("completion", {"prompt": [5, 6], "suffix": "return x"}, 400, "with suffix, the prompt must be text", "prompt"),
    ("completion", {"prompt": PROMPT, "infill_strategy": "slack"}, 400, "with a non-empty suffix", "infill_strategy"),
    ("completion", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream", "stream_options"),
    ("completion", {"prompt": PROMPT, "n": 1000}, 400, "never fit", "n"),
    ("completion", {"prompt": PROMPT, "t_min": 0.9, "t_max": 0.5}, 400, "t_min", None),
    # OpenAI features we do not have: a 400 that names them, never silence
    ("chat", {"messages": CHAT, "logprobs": True}, 400, "not supported", "logprobs"),
    ("chat", {"messages": CHAT, "top_logprobs": 2}, 400, "not supported", "top_logprobs"),
    ("chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "not among the tools", "tool_choice"),
    ("chat", {"messages": CHAT, "tool_choice": "auto"}, 400, "needs tools", "tool_choice"),
    # a stop string could cut the forced call (stop "}" ended it inside its arguments), as a stop id could
    *[("chat", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": choice,
                **stop}, 400, "would cut it", next(iter(stop)))
      for choice in ("required", {"type": "function", "function": {"name": "f"}})
      for stop in ({"stop": "}"}, {"stop": ["x", "}"]}, {"stop_token_ids": [5]})],
    ("chat", {"messages": CHAT, "functions": [{"name": "f"}]}, 400, "function", "functions"),
    ("chat", {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "json_schema", "response_format"),
    ("completion", {"prompt": PROMPT, "structured_outputs": {"grammar": "root ::= x"}}, 400, "grammar",
     "structured_outputs"),
    ("chat", {"messages": CHAT, "logit_bias": {"5": 10}}, 400, "logit_bias", "logit_bias"),
    ("chat", {"messages": CHAT, "top_p": 0.5}, 400, "top_p", "top_p"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "no vision tower", None),
    ("completion", {"prompt": PROMPT, "echo": True}, 400, "echo", "echo"),
    ("completion", {"prompt": PROMPT, "best_of": 2}, 400, "best_of", "best_of"),
    ("completion", {"prompt": PROMPT, "logprobs": 1}, 400, "not supported", "logprobs"),
    # completions' logprobs is a count: 0 asks for the sampled token's log-probability (chat's false is off)
    ("completion", {"prompt": PROMPT, "logprobs": 0}, 400, "not supported", "logprobs"),
]


@pytest.mark.parametrize("endpoint,body,status,text,param", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests(http, endpoint, body, status, text, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    assert_error(http.post(path, json={"model": MODEL, **body}), status, text, param)


def test_context_length_in_whole_canvases(http, server, monkeypatch):
    """prompt + max_tokens must fit in max_model_len, the answer counted in whole canvases; an unset max_tokens
    is the room left (at most the checkpoint's default, made large here), as in vLLM."""
    llm = server.server_state.llm
    monkeypatch.setattr(llm.defaults, "max_new_tokens", 1000)
    limit = llm.max_model_len
    prompt = [2] + [100] * (limit - 2 * CANVAS - 6)  # room for 2 canvases and 5 tokens: 2 canvases
    r = http.post("/v1/completions", json={"prompt": prompt, "ignore_eos": True, "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2 * CANVAS and r.json()["choices"][0]["finish_reason"] == "length"
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2 * CANVAS + 1})
    assert_error(r, 400, f"at most {2 * CANVAS}", "max_tokens")
    assert f"whole canvases of {CANVAS} tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    for short in (CANVAS - 1, 0):  # not even one canvas fits: the prompt is what must shrink
        r = http.post("/v1/completions", json={"prompt": [2] + [100] * (limit - short - 1)})
        assert_error(r, 400, f"at most {limit - CANVAS}", "prompt")
        assert r.json()["error"]["code"] == "context_length_exceeded"
    words = " ".join(["cat"] * limit)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": words}]})
    assert_error(r, 400, f"whole canvases of {CANVAS} tokens", "messages")


@pytest.mark.parametrize("raw", [b'{"messages": [', b"not json", b"[1, 2]", b""])
def test_malformed_bodies(http, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt=PROMPT, suffix="x", max_tokens=1000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT}, headers=headers)
        assert_error(r, 401, "API key")
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unexpected_errors_are_500_json_and_the_server_lives_on(http, server, client, monkeypatch):
    llm = server.server_state.llm

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", broken)
    assert_error(http.post("/v1/chat/completions", json={"messages": CHAT}), 500, "boom")
    monkeypatch.undo()
    # an engine step that fails: the requests in it get a 500, the engine keeps going
    step = llm.runner.step
    calls = {"n": 0}

    def failing_once(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine boom")
        return step(rows)

    monkeypatch.setattr(llm.runner, "step", failing_once)
    assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}), 500, "engine boom")
    # once streaming has started the error comes in-band, in the same shape; the openai client raises it
    calls["n"] = 0
    with pytest.raises(openai.APIError, match="engine boom"):
        list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True))
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, seed=0).choices[0].finish_reason
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------- the queue
def test_full_queue_gives_429_with_retry_after():
    llm = LLM(None, max_num_seqs=1, max_model_len=1024)
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], max_queue=1))
    long = {"prompt": PROMPT, "max_tokens": 900, "seed": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"denoising_preview": True}}
    try:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            with http.stream("POST", "/v1/completions", json=long) as running:
                # keep the line iterator referenced: a dropped httpx iterator closes the connection (= disconnect)
                lines = running.iter_lines()
                next(line for line in lines if line.startswith("event: denoising_preview"))
                with http.stream("POST", "/v1/completions", json=long) as queued:  # headers sent = it is queued
                    assert queued.status_code == 200
                    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
                    assert_error(r, 429, "capacity")
                    assert r.headers["Retry-After"] == "1"
                    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
                    with pytest.raises(openai.RateLimitError):
                        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
            # both long requests were dropped: their rows leave at the next step and new work is taken again
            small = {"prompt": PROMPT, "max_tokens": 4}
            eventually(lambda: http.post("/v1/completions", json=small).status_code == 200)
    finally:
        live.stop()


# ------------------------------------------------------------------------------------------- the command
def test_letterpress_serve_command(tmp_path):
    """The real `letterpress serve`: start-up log, served name, API key from the environment."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**__import__("os").environ, "LETTERPRESS_API_KEY": "env-key"}
    cmd = [sys.executable, "-m", "letterpress.cli", "serve", "--port", str(port), "--served-model-name", "tiny-cli",
           "--max-model-len", "512", "--max-denoising-steps", "2"]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-cli"]
        assert client.completions.create(model="tiny-cli", prompt=PROMPT, max_tokens=4).usage.completion_tokens <= 4
        log.seek(0)
        startup = log.read()
        assert "tiny-cli" in startup and "float32" in startup and "cpu" in startup
        assert f"http://127.0.0.1:{port}/v1" in startup
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
