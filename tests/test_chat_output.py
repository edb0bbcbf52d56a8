"""Output parsing: thought channel to reasoning, Gemma tool-call syntax to OpenAI tool calls, in any split."""

from __future__ import annotations

import json
import random

import pytest

from letterpress.chat_output import ChatOutput, StreamParser, parse_output, prompt_opens_reasoning

Q = '<|"|>'

# (model output, expected content, expected reasoning, expected calls as (name, arguments dict))
CASES = {
    "plain": ("Hello there.<turn|>", "Hello there.", "", []),
    "thought then answer": ("<|channel>thought\nThe user greets.\n<channel|>Hi!<turn|>", "Hi!", "The user greets.", []),
    "think tags": ("<think>\nhmm\n</think>\n\nFour.", "Four.", "hmm", []),
    "one call after thinking": (
        f"<|channel>thought\nNeed weather.<channel|><|tool_call>call:weather{{city:{Q}Paris{Q}}}<tool_call|><|tool_response>",
        "", "Need weather.", [("weather", {"city": "Paris"})]),
    "typed arguments": (
        f"<|tool_call>call:search{{query:{Q}a, b: {{c}}{Q},limit:3,ratio:-1.5e2,exact:true,off:false,none:null,"
        f"filter:{{since:2020,tags:[{Q}x{Q},{Q}y{Q}],deep:{{ok:true}}}},empty:[],list:[1,2.5,{Q}z{Q}]}}<tool_call|>",
        "", "", [("search", {"query": "a, b: {c}", "limit": 3, "ratio": -150.0, "exact": True, "off": False,
                             "none": None, "filter": {"since": 2020, "tags": ["x", "y"], "deep": {"ok": True}},
                             "empty": [], "list": [1, 2.5, "z"]})]),
    "two calls": (
        f"<|tool_call>call:weather{{city:{Q}Oslo{Q}}}<tool_call|><|tool_call>call:time{{}}<tool_call|>",
        "", "", [("weather", {"city": "Oslo"}), ("time", {})]),
    "two calls one block": (f"<|tool_call>call:a{{x:1}}call:b{{y:{Q}2{Q}}}<tool_call|>", "", "",
                            [("a", {"x": 1}), ("b", {"y": "2"})]),
    "call closed by turn end": (f"<|tool_call>call:f{{k:{Q}v{Q}}}<turn|>", "", "", [("f", {"k": "v"})]),
    "call cut by canvas end": (f"<|tool_call>call:f{{k:{Q}v{Q}}}", "", "", [("f", {"k": "v"})]),
    "call ends reasoning": ("<|channel>thought\nplan<|tool_call>call:f{}<tool_call|>", "", "plan", [("f", {})]),
    "bare call after channel": (f"<|channel>thought\nx<channel|>call:weather{{city:{Q}Rome{Q}}}", "", "x",
                                [("weather", {"city": "Rome"})]),
    "bare unquoted and json strings": ('call:f{city: Paris, "note": "a\\"b", n: 07x}', "", "",
                                       [("f", {"city": "Paris", "note": 'a"b', "n": "07x"})]),
    "colon after the marker": (f"<|tool_call>:call:bash{{command:{Q}pytest{Q}}}<tool_call|>", "", "",
                               [("bash", {"command": "pytest"})]),
    "bare call on a new line": (f"Let me look.\ncall:fs.read_file{{path:{Q}/a{Q}}}\ncall:web-search{{q:1}}", "Let me look.",
                                "", [("fs.read_file", {"path": "/a"}), ("web-search", {"q": 1})]),
    "fragment call tag": (f"<call>get_weather{{city:{Q}Paris{Q}}}", "", "", [("get_weather", {"city": "Paris"})]),
    "line starting with call: that is text": ("Plan:\ncall: me maybe\ncall:x", "Plan:\ncall: me maybe\ncall:x", "", []),
    "text then call then text": ("Let me check. <|tool_call>call:f{}<tool_call|> Done.", "Let me check. Done.", "",
                                 [("f", {})]),
    "hidden tokens": ("Hi<eos><pad><pad>", "Hi", "", []),
    "stray markers": ("<channel|>Answer<tool|> now</think>", "Answer now", "", []),
    "malformed call stays content": (f"<|tool_call>call:f{{k:{Q}v}}<tool_call|>", f"<|tool_call>call:f{{k:{Q}v}}<tool_call|>",
                                     "", []),
    "malformed missing brace": ("<|tool_call>call:f{k:1<tool_call|>", "<|tool_call>call:f{k:1<tool_call|>", "", []),
    "call closed by turn end but malformed": ("<|tool_call>call:f{k:<turn|>", "<|tool_call>call:f{k:", "", []),
    "not a call": ("<|tool_call>weather please<tool_call|>", "<|tool_call>weather please<tool_call|>", "", []),
    "bare call never closed": ("call:f{a:1", "call:f{a:1", "", []),
    "word call": ("calling you", "calling you", "", []),
    "unclosed channel": ("<|channel>thought\nstill thinking", "", "still thinking", []),
    "text after turn end ignored": ("A<turn|><|turn>user\nB", "A", "", []),
    "code keeps its whitespace": ("\n    return x\n\n", "\n    return x\n\n", "", []),
    "whitespace around a call": ("A \n<|tool_call>call:f{}<tool_call|>\n B \n<turn|>", "A \nB", "", [("f", {})]),
    "partial marker at the end": ("Answer <|chan", "Answer <|chan", "", []),
}


def _calls(output: ChatOutput) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in output.tool_calls]


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_output(name: str) -> None:
    text, content, reasoning, calls = CASES[name]
    out = parse_output(text, hidden=("<eos>", "<pad>"))
    assert (out.content, out.reasoning, _calls(out)) == (content, reasoning, calls)
    for call in out.tool_calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert call.to_openai()["type"] == "function"


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_split_gives_the_same_result(name: str) -> None:
    text = CASES[name][0]
    whole = parse_output(text, hidden=("<eos>", "<pad>"))
    expected = (whole.content, whole.reasoning, _calls(whole))
    for cut in range(len(text) + 1):
        parser = StreamParser(hidden=("<eos>", "<pad>"))
        out = ChatOutput().add(parser.feed(text[:cut])).add(parser.feed(text[cut:])).add(parser.finish())
        assert (out.content, out.reasoning, _calls(out)) == expected, cut
    rng = random.Random(0)
    for _ in range(20):  # several random cuts at once
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        parser = StreamParser(hidden=("<eos>", "<pad>"))
        out = ChatOutput()
        for piece in pieces:
            out.add(parser.feed(piece))
        out.add(parser.finish())
        assert (out.content, out.reasoning, _calls(out)) == expected


def test_markers_are_never_shown_early() -> None:
    # A stream cut inside "<|tool_call>" shows none of it before the call is known.
    parser = StreamParser()
    shown = [d.content for d in parser.feed("Checking <|tool_")] + [d.content for d in parser.feed("call>call:f{}")]
    assert "".join(shown) == "Checking"
    assert [d.tool_call.name for d in parser.feed("<tool_call|>") if d.tool_call] == ["f"]


def test_reasoning_open_from_the_prompt() -> None:
    prompt = "<|turn>model\n<|tool_response>response:f{value:1}<tool_response|><|channel>thought\n"
    assert prompt_opens_reasoning(prompt)
    assert not prompt_opens_reasoning("<|turn>model\n<|channel>thought\n<channel|>")
    out = parse_output("It is sunny.<channel|>Sunny in Paris.", start_in_reasoning=True)
    assert (out.content, out.reasoning) == ("Sunny in Paris.", "It is sunny.")


def test_without_tools_calls_stay_text() -> None:
    text = f"<|tool_call>call:f{{a:{Q}b{Q}}}<tool_call|>"
    out = parse_output(text, tool_calls=False)
    assert (out.content, out.tool_calls) == (text, [])


def test_bare_calls_only_for_declared_names() -> None:
    assert parse_output("call:weather{city:Paris}", tool_names={"weather"}).tool_calls[0].name == "weather"
    out = parse_output("call:other{x:1}", tool_names={"weather"})
    assert (out.content, out.tool_calls) == ("call:other{x:1}", [])
    # an undeclared name is shown at once, not held until its braces close
    assert [d.content for d in StreamParser(tool_names={"weather"}).feed("call:other{x:")] == ["call:other{x:"]


def test_garbage_never_raises() -> None:
    rng = random.Random(1)
    alphabet = ["<|tool_call>", "<tool_call|>", "<|channel>", "<channel|>", Q, "call:", "f", "{", "}", "[", "]",
                ":", ",", "1", "true", " ", "\n", "<think>", "</think>", "<turn|>", "thought\n", '"']
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        parser = StreamParser()
        out = ChatOutput()
        for i in range(0, len(text), 3):
            out.add(parser.feed(text[i:i + 3]))
        out.add(parser.finish())
        for call in out.tool_calls:
            assert isinstance(json.loads(call.arguments), dict)


def test_llm_chat_takes_tools_and_template_kwargs(tmp_path) -> None:
    # The library path: LLM.chat renders tools and the thinking switch; the output parses (stays content here,
    # the tiny model knows no tool syntax).
    import shutil

    from letterpress import LLM, SamplingParams
    from letterpress.embedded import default_model_dir
    from letterpress.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, tmp_path / name)
    shutil.copy(default_model_dir().parent.parent / "chat_templates" / "gemma4_tools.jinja",
                tmp_path / "chat_template.jinja")
    llm = LLM(None, max_num_seqs=1, max_model_len=512)
    llm.tokenizer = Tokenizer.from_dir(tmp_path)
    tools = [{"type": "function", "function": {"name": "f", "description": "F"}}]
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(max_new_tokens=4, max_denoising_steps=1, seed=0), tools=tools,
                   chat_template_kwargs={"enable_thinking": True})[0]
    prompt = llm.tokenizer.apply_chat_template(messages, tools=tools, enable_thinking=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(prompt) and "<|tool>declaration:f{" in prompt
    parsed = parse_output(llm.tokenizer.decode(out.token_ids, skip_special_tokens=False))
    assert isinstance(parsed.content, str)


def test_a_whole_output_that_closes_a_thought_first_began_in_one():
    """With thinking on, a prompt after a tool response ends inside an open thought channel; the model's output
    is then `thought<channel|>answer`. parse_output, the README's Python recipe, glued the two into content; it
    now reads a leading close as the end of a thought (start_in_reasoning given explicitly still wins)."""
    out = parse_output("Let me look at the result.<channel|>It is 14:05 in Riga.")
    assert out.reasoning == "Let me look at the result." and out.content == "It is 14:05 in Riga."
    assert parse_output("<|channel>thought\nhmm<channel|>Answer").content == "Answer"
    assert parse_output("Plain answer").reasoning == ""
    assert parse_output("a<channel|>b", start_in_reasoning=False).reasoning == ""


def test_an_overflowing_number_in_a_call_stays_valid_json():
    """1e999 became float inf, written as Infinity, which JSON.parse and strict parsers reject."""
    [call] = parse_output("<|tool_call>call:f{b:1e999,c:2.5}<tool_call|>").tool_calls
    assert json.loads(call.arguments) == {"b": "1e999", "c": 2.5}
