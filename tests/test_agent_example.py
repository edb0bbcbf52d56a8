"""README's agent example, run as written (only its address changed) with the real `openai` client against a real
server on loopback, and the multi-turn reuse of the encoded history through the prefix cache.

The server runs the shipped tiny model with the Gemma-4-style tool template (`--chat-template`). That model
never writes a tool call, so its *words* are scripted as in tests/test_server_chat.py: the engine denoises
for real and the tokenizer's decode turns the generated tokens into the next scripted answer (a call to
`calculate` while no tool result is in the conversation, then the answer). The template rendering, the
output parser, the tool-call ids and the history sent back all run for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from letterpress import LLM  # noqa: E402
from letterpress.server.app import ServerConfig  # noqa: E402
from letterpress.tokenizer import load_chat_template  # noqa: E402

from .live_server import MODEL, LiveServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "letterpress" / "chat_templates" / "gemma4_tools.jinja"
KEY = "sk-local"  # the README's key
Q = '<|"|>'
BLOCK = 16  # --block-size


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.split("<!-- agent-example:", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


class ScriptedModel:
    """decode(ids, skip_special_tokens=False) of any generated tokens is the scripted answer for the request
    being prepared (chosen by `answer_for` from its messages); other decodes are the real ones."""

    def __init__(self, tokenizer, answers):
        self.real, self.answers, self.text = tokenizer.decode, answers, ""

    def answer_for(self, messages: list) -> None:
        self.text = self.answers(messages)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens or not ids:
            return self.real(ids, skip_special_tokens=skip_special_tokens)
        return self.text


def calculator_answers(messages: list) -> str:
    """Call calculate until a tool result is in the conversation; then answer with it (reasoning first: with
    thinking on, the prompt after a tool response ends in an open thought channel)."""
    results = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "tool"]
    if not results:
        return (f"<|channel>thought\nI should compute this with the calculator.<channel|>"
                f"<|tool_call>call:calculate{{expression:{Q}17 * 23 + 4{Q}}}<tool_call|>")
    return f"The calculator says {results[-1]}.\n<channel|>17 * 23 + 4 = {results[-1]}."


def two_calls_answers(messages: list) -> str:
    """Two rounds of calls (first 17 * 23, then that + 4), then the answer."""
    results = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "tool"]
    if len(results) < 2:
        expression = "17 * 23" if not results else f"{results[0]} + 4"
        reasoning = "<|channel>thought\nFirst the product.<channel|>" if not results else "Now add four.\n<channel|>"
        return f"{reasoning}<|tool_call>call:calculate{{expression:{Q}{expression}{Q}}}<tool_call|>"
    return f"Done.\n<channel|>It is {results[-1]}."


@pytest.fixture(scope="module")
def server():
    llm = LLM(None, max_num_seqs=4, max_model_len=1024, prefill_chunk=64)
    llm.defaults.max_denoising_steps = 2
    llm.defaults.eos_token_ids = []  # the scripted answer is whatever the model wrote: let it write something
    llm.tokenizer.set_chat_template(load_chat_template(str(TEMPLATE)))  # what --chat-template does
    script = ScriptedModel(llm.tokenizer, calculator_answers)
    llm.tokenizer.decode = script.decode
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY))
    state = live.server_state
    chat_job = state.chat_job

    def scripted_chat_job(body):
        script.answer_for(body.messages)
        return chat_job(body)

    state.chat_job = scripted_chat_job
    live.script = script
    yield live
    live.stop()


def test_readme_agent_example_runs(server, capsys):
    server.script.answers = calculator_answers
    code = readme_example().replace("http://127.0.0.1:8000/v1", server.url + "/v1")
    exec(compile(code, "README.md (agent example)", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "17 * 23 + 4 = 395."  # the calculator ran on the model's call and the answer came back
    turns = [re.fullmatch(r"turn (\d+): (\d+) of (\d+) prompt tokens cached", line) for line in lines[:-1]]
    assert [int(t.group(1)) for t in turns] == [0, 1]
    (_, cached0, prompt0), (_, cached1, prompt1) = [tuple(map(int, t.groups())) for t in turns]
    assert cached0 == 0 and cached1 == prompt0 // BLOCK * BLOCK and prompt1 > prompt0


def test_tool_loop_reuses_the_encoded_history(server):
    """Each request extends the previous conversation; its cached_tokens covers every full block of the previous
    request's prompt (found with /tokenize), and the history renders as the model wrote it."""
    server.script.answers = two_calls_answers
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    tools = [{"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    kwargs = dict(model=MODEL, tools=tools, max_tokens=64, seed=0,
                  extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    messages = [{"role": "system", "content": "You are a careful assistant. Use the calculator for arithmetic."},
                {"role": "user", "content": "What is 17 * 23 + 4? Show your steps."}]
    previous: list[int] = []
    finish = []
    for turn in range(3):
        prompt = http.post("/tokenize", json={"messages": messages, "tools": tools,
                                              "chat_template_kwargs": {"enable_thinking": True}}).json()["tokens"]
        reply = client.chat.completions.create(messages=messages, **kwargs)
        assert reply.usage.prompt_tokens == len(prompt)
        common = next((i for i, (a, b) in enumerate(zip(previous, prompt)) if a != b), len(previous))
        # the whole previous prompt is a prefix of this one (the last token may merge differently)
        assert common >= len(previous) - 1
        assert reply.usage.prompt_tokens_details.cached_tokens == common // BLOCK * BLOCK
        if turn:
            assert reply.usage.prompt_tokens_details.cached_tokens >= len(previous) - BLOCK
        message = reply.choices[0].message
        finish.append(reply.choices[0].finish_reason)
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls or []:
            expression = json.loads(call.function.arguments)["expression"]
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(eval(expression, {}))})
        previous = prompt
    assert finish == ["tool_calls", "tool_calls", "length"] and messages[-1]["content"] == "It is 395."
    http.close()


@pytest.fixture(scope="module")
def real_server():
    """The shipped tiny model and the tool template, nothing scripted."""
    llm = LLM(None, max_num_seqs=2, max_model_len=1024, prefill_chunk=64)
    llm.defaults.max_denoising_steps = 4
    llm.tokenizer.set_chat_template(load_chat_template(str(TEMPLATE)))
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY))
    yield live
    live.stop()


def test_the_tiny_model_calls_when_tool_choice_names_the_tool(real_server):
    """The model's own words: it never calls on its own, but with tool_choice naming the tool the canvas is
    constrained to a call of `calculate` whose arguments match its schema (letterpress.structured); the loop
    then sends the result back, and the next turn reuses the first prompt from the prefix cache."""
    client = openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0)
    tools = [{"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string", "maxLength": 20}}, "required": ["expression"]}}}]
    messages = [{"role": "user", "content": "What is 17 * 23 + 4?"}]
    kwargs = dict(model=MODEL, tools=tools, max_tokens=64, seed=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    first = client.chat.completions.create(messages=messages, tool_choice={"type": "function", "function": {"name": "calculate"}},
                                           **kwargs)
    [call] = first.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "calculate"
    assert set(arguments) == {"expression"} and isinstance(arguments["expression"], str)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "395"}]
    second = client.chat.completions.create(messages=messages, tool_choice="none", **kwargs)
    assert second.choices[0].message.tool_calls is None
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens // BLOCK * BLOCK
