"""Tools, thinking and tool calls over HTTP: the real `openai` client against a real server on loopback.

The tiny embedded model does not know the Gemma 4 chat format, so its output is forced: the engine runs for
real (two canvases, ignore_eos), and the tokenizer's decode turns the first k of the N generated tokens into
the first k/N of a scripted text. The canvas boundary is placed inside a marker, so the server has to hold a
split `<|tool_call>` back across canvases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from letterpress import LLM  # noqa: E402
from letterpress.embedded import default_model_dir  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402
from letterpress.tokenizer import Tokenizer  # noqa: E402

from .live_server import KEY, MODEL, LiveServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "letterpress" / "chat_templates" / "gemma4_tools.jinja"
CANVAS = json.loads((default_model_dir() / "config.json").read_text())["canvas_length"]
Q = '<|"|>'
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL_OUTPUT = (f"<|channel>thought\nThe user wants the weather, so I call the tool for Paris.<channel|>"
               f"<|tool_call>call:weather{{city:{Q}Paris{Q},days:2}}<tool_call|>")
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class Script:
    """decode(ids, skip_special_tokens=False) of the first k of N tokens gives the first k/N of `text`."""

    def __init__(self, tokenizer: Tokenizer):
        self.real = tokenizer.decode
        self.text, self.tokens = "", 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:  # previews and anything else: the real text
            return self.real(ids, skip_special_tokens=True)
        return self.text[: len(self.text) * len(ids) // self.tokens]

    def split_inside(self, text: str, marker: str) -> int:
        """Set `text` and return a token count N (two canvases) whose canvas boundary falls inside `marker`."""
        start = text.index(marker)
        for n in range(CANVAS + 1, 2 * CANVAS + 1):
            if start < len(text) * CANVAS // n < start + len(marker):
                self.text, self.tokens = text, n
                return n
        raise AssertionError("no token count splits the marker")

    def whole(self, text: str, n: int = 8) -> int:
        self.text, self.tokens = text, n
        return n


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4_template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    shutil.copy(TEMPLATE, folder / "chat_template.jinja")
    llm = LLM(None, max_num_seqs=8, max_model_len=1024, prefill_chunk=64)
    llm.defaults.max_denoising_steps = 2
    llm.tokenizer = Tokenizer.from_dir(folder)  # same vocabulary, the Gemma-4-style template
    script = Script(llm.tokenizer)
    llm.tokenizer.decode = script.decode
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY))
    live.script = script
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def create(client, n_tokens: int, **kwargs):
    return client.chat.completions.create(model=MODEL, max_tokens=n_tokens, seed=0,
                                          extra_body={"ignore_eos": True, **kwargs.pop("extra_body", {})}, **kwargs)


def test_tool_call_and_reasoning(client, server):
    n = server.script.split_inside(CALL_OUTPUT, "<|tool_call>")
    resp = create(client, n, messages=ASK, tools=[WEATHER], extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    extras = choice.message.model_extra
    assert extras["reasoning"] == extras["reasoning_content"] == "The user wants the weather, so I call the tool for Paris."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    # the prompt is the template's rendering with the tools and the thinking switch
    tok = server.server_state.llm.tokenizer
    prompt = tok.apply_chat_template(ASK, tools=[WEATHER], enable_thinking=True)
    assert resp.usage.prompt_tokens == len(tok.encode(prompt)) and "<|think|>" in prompt and "declaration:weather" in prompt


def test_streamed_tool_call_matches(client, server):
    n = server.script.split_inside(CALL_OUTPUT, "<|tool_call>")
    chunks = list(create(client, n, messages=ASK, tools=[WEATHER], stream=True,
                         extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "" and reasoning == "The user wants the weather, so I call the tool for Paris."
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "weather", {"city": "Paris", "days": 2})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_loop_history_and_answer(client, server):
    first = create(client, server.script.whole(CALL_OUTPUT), messages=ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    answer = create(client, server.script.whole("Sunny, 24 C in Paris.<turn|>"), messages=history, tools=[WEATHER])
    assert answer.choices[0].message.content == "Sunny, 24 C in Paris." and answer.choices[0].finish_reason == "length"
    tok = server.server_state.llm.tokenizer
    prompt = tok.apply_chat_template([*ASK, {**history[1], "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": 2}}}]},
        history[2]], tools=[WEATHER])
    assert f'call:weather{{city:{Q}Paris{Q},days:2}}<tool_call|><|tool_response>response:weather' in prompt
    assert answer.usage.prompt_tokens == len(tok.encode(prompt))


def test_thinking_resumes_after_a_tool_response(client, server):
    # With thinking on, the prompt after a tool response ends in an open thought channel: the output starts as
    # reasoning, and the answer follows <channel|>. Streamed and whole agree.
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_a", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}]
    text = "The tool says sunny.\n<channel|>It is sunny in Paris.<turn|>"
    kwargs = dict(messages=history, tools=[WEATHER], extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    n = server.script.split_inside(text, "<channel|>")
    whole = create(client, n, **kwargs).choices[0].message
    assert (whole.content, whole.model_extra["reasoning"]) == ("It is sunny in Paris.", "The tool says sunny.")
    chunks = list(create(client, n, stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.content
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks) == "The tool says sunny."
    no_reasoning = create(client, n, **{**kwargs, "extra_body": {**kwargs["extra_body"], "include_reasoning": False}})
    assert "reasoning" not in no_reasoning.choices[0].message.model_extra


def test_tool_choice_none_keeps_calls_as_text(client, server):
    resp = create(client, server.script.whole(CALL_OUTPUT), messages=ASK, tools=[WEATHER], tool_choice="none")
    message = resp.choices[0].message
    assert message.tool_calls is None and message.content.startswith("<|tool_call>call:weather{")


def test_refused_requests(client):
    for kwargs, match in [
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "rain"}}}, "not among the tools"),
        ({"tool_choice": "auto"}, "needs tools"),
        ({"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}}, "may not set"),
        ({"tools": ["weather"]}, "tools"),
    ]:
        with pytest.raises(openai.BadRequestError, match=match):
            create(client, 4, messages=ASK, **kwargs)
