"""Structured output by constrained denoising: every output parses and validates, even from a random model.

The DP is checked alone on random log-probabilities (no model: any scores must give a valid text), then
through the engine with a random checkpoint whose canvas (16 tokens) is shorter than most answers, so the
constraint has to carry across canvases, and over HTTP with the real `openai` client (response_format,
structured_outputs, tool_choice required / named)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from letterpress import LLM
from letterpress.chat_output import parse_output
from letterpress.embedded import default_model_dir
from letterpress.engine.request import SamplingParams
from letterpress.errors import ConfigError, RequestError
from letterpress.structured import (GEMMA, SchemaError, StructuredOutputsParams, best_path, compile_regex,
                                    schema_regex, tool_call_regex)
from letterpress.tokenizer import Tokenizer

from benchmarks.schema_suite import SUITE

from .fast_fixtures import save_checkpoint

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
EOS = [1]
CANVAS = 16


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


def _canvases(automaton, tokenizer, budget: int, seed: int, canvas: int = CANVAS) -> str:
    """Run the DP canvas after canvas on random scores, as the runner does, and return the text."""
    g = torch.Generator().manual_seed(seed)
    state, tokens = 0, []
    while True:
        left = budget - len(tokens)
        logp = torch.log_softmax(3 * torch.randn(canvas, tokenizer.vocab_size, generator=g), -1)
        path = best_path(logp[:min(canvas, left)], automaton, state, EOS, None if left <= canvas else left - canvas)
        out = path.tokens.tolist()
        if EOS[0] in out:
            return tokenizer.decode(tokens + out[:out.index(EOS[0])])
        tokens += out
        if left <= canvas:
            return tokenizer.decode(tokens)
        state = automaton.walk(state, out)
        assert state is not None


@pytest.mark.parametrize("name", sorted(SUITE))
def test_dp_on_random_scores_always_validates(tokenizer, name):
    schema = SUITE[name]
    automaton = compile_regex(schema_regex(schema), tokenizer, EOS)
    for seed in range(4):
        text = _canvases(automaton, tokenizer, budget=120, seed=seed)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", ["nested", "enums", "optional", "refs_anyof"])
def test_tool_call_syntax_validates(tokenizer, name):
    """Gemma's call syntax: what the DP writes is parsed by the chat parser into arguments that validate."""
    schema = SUITE[name] if SUITE[name]["type"] == "object" else None
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    automaton = compile_regex(tool_call_regex([tool], "f", parallel=False), tokenizer, EOS)
    for seed in range(3):
        out = parse_output(_canvases(automaton, tokenizer, budget=150, seed=seed), tool_calls=True)
        [call] = out.tool_calls
        assert call.name == "f" and out.content == ""
        jsonschema.validate(json.loads(call.arguments), schema)


def test_gemma_keys_are_sorted_like_the_template():
    regex = schema_regex({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"const": "x"}},
                          "required": ["a", "b"]}, GEMMA)
    assert re.fullmatch(regex, 'a:<|"|>x<|"|>,b:3'.join("{}"))
    assert not re.fullmatch(regex, '{b:3,a:<|"|>x<|"|>}')
    # case does not order them (Jinja's dictsort): a before B, as the template writes the call back
    mixed = schema_regex({"type": "object", "properties": {"a": {"type": "integer"}, "B": {"type": "integer"}},
                          "required": ["a", "B"]}, GEMMA)
    assert re.fullmatch(mixed, "{a:1,B:2}") and not re.fullmatch(mixed, "{B:2,a:1}")


@pytest.mark.parametrize("schema,message", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
     "recursive"),
    ({"type": "strng"}, "invalid JSON schema"),
    ({"type": "string", "format": "email"}, "email"),
    ({"type": "string", "pattern": 'a"b'}, "cannot hold unescaped"),
    ({"type": "number", "minimum": -1.5}, "bounds on a number"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "no number"),
    ([1, 2], "must be an object"),
])
def test_schemas_refused_with_reason(schema, message):
    with pytest.raises(SchemaError, match=re.escape(message)):
        schema_regex(schema)


def test_literal_then_bounded_repeat_compiles():
    """outlines-core alone determinizes ".*1[1-9]{24}" (2**24 subsets: minutes); with the sentinel it is
    linear (automaton.py). Also checks the sudoku tokenizer (word tokens) and the accepted language."""
    sudoku = Tokenizer.from_dir(ROOT / "letterpress" / "assets" / "sudoku")
    automaton = compile_regex("1[1-9]{24}", sudoku, EOS)
    ids = sudoku.encode(" ".join("1" + "5" * 24))
    assert automaton.accepting[automaton.walk(0, ids)] and automaton.walk(0, sudoku.encode("2")) is None
    assert int(automaton.distance[0]) == 25


def _dict_automaton(regex: str, tokenizer: Tokenizer) -> tuple[list[dict[int, int]], set[int], list[int]]:
    """The automaton as first shipped: outlines-core's get_transitions() over the whole vocabulary (one
    spelling per token, no byte classes) as one dict per state (EOS and the sentinel left out), numbered
    breadth first; its accepting states, and each state's fewest tokens to one."""
    from outlines_core import Index, Vocabulary

    from letterpress.structured.automaton import _SENTINEL_ID, SENTINEL, _vocabulary
    from letterpress.structured.regex import narrow

    spelled = dict(_vocabulary(tokenizer, EOS[0], frozenset())[0])
    spelled[SENTINEL.encode()] = [_SENTINEL_ID]
    index = Index(SENTINEL + f"(?:{narrow(regex, SENTINEL)})", Vocabulary(EOS[0], spelled))
    raw = {s: {t: d for t, d in row.items() if t not in (EOS[0], _SENTINEL_ID)}
           for s, row in index.get_transitions().items()}
    order = [index.get_transitions()[index.get_initial_state()][_SENTINEL_ID]]
    number = {order[0]: 0}
    for s in order:
        for d in raw.get(s, {}).values():
            if d not in number:
                number[d] = len(order)
                order.append(d)
    moves = [{t: number[d] for t, d in raw.get(s, {}).items()} for s in order]
    accepting = {number[s] for s in index.get_final_states() if s in number}
    incoming: list[set[int]] = [set() for _ in moves]
    for s, row in enumerate(moves):
        for d in row.values():
            incoming[d].add(s)
    distance, queue = [None] * len(moves), sorted(accepting)
    for s in queue:
        distance[s] = 0
    for d in queue:  # breadth first, backwards (the list grows as it is read)
        for s in sorted(incoming[d]):
            if distance[s] is None:
                distance[s] = distance[d] + 1
                queue.append(s)
    return moves, accepting, distance


@pytest.mark.parametrize("which", ["optional", "json_object", "tool_call", "sudoku"])
def test_compact_automaton_matches_the_dict_walk(tokenizer, which):
    """The sorted edge tensors + offsets, compiled over byte classes, are the per-state dicts over the whole
    vocabulary up to state numbering: state by state (matched breadth first from the start) the same allowed
    tokens, next states, accepting flags and distances; binary-search lookups agree, tokens next to the
    allowed ones are refused, and random walks along the dicts end in the matching state."""
    if which == "sudoku":
        tokenizer = Tokenizer.from_dir(ROOT / "letterpress" / "assets" / "sudoku")
        regex = "1[1-9]{24}"
    elif which == "json_object":
        from letterpress.structured import json_object_regex

        regex = json_object_regex()
    elif which == "tool_call":
        regex = tool_call_regex([{"type": "function", "function": {"name": "f", "parameters": SUITE["nested"]}}])
    else:
        regex = schema_regex(SUITE["optional"])
    moves, accepting, distance = _dict_automaton(regex, tokenizer)
    automaton = compile_regex(regex, tokenizer, EOS)
    assert automaton.src.numel() == sum(map(len, moves))
    ours = {0: 0}  # dict state -> our state
    g = torch.Generator().manual_seed(0)
    for s in range(len(moves)):  # breadth-first order: every state is matched before it is visited
        row, o = moves[s], ours[s]
        assert automaton.allowed(o).tolist() == sorted(row)
        lo, hi = automaton.offsets[o: o + 2].tolist()
        assert automaton.src[lo:hi].eq(o).all()
        for t, d in zip(sorted(row), automaton.dst[lo:hi].tolist()):
            assert ours.setdefault(row[t], d) == d
        assert bool(automaton.accepting[o]) == (s in accepting)
        assert int(automaton.distance[o]) == (2**30 if distance[s] is None else distance[s])
        some = sorted(row)[:: max(1, len(row) // 50)]  # the binary search, on up to ~50 tokens of the state
        assert all(automaton.next_state(o, t) == ours[row[t]] for t in some)
        refused = {t + 1 for t in some} | {t - 1 for t in some} | set(torch.randint(0, tokenizer.vocab_size, (8,),
                                                                                    generator=g).tolist())
        assert all(automaton.next_state(o, t) is None for t in refused - set(row))
    assert len(set(ours.values())) == len(moves) == automaton.num_states  # one to one
    for _ in range(20):  # random walks along the dicts, then one token the last state refuses
        state, path = 0, []
        while moves[state] and len(path) < 30:
            tokens = sorted(moves[state])
            path.append(tokens[int(torch.randint(len(tokens), (1,), generator=g))])
            state = moves[state][path[-1]]
        assert automaton.walk(0, path) == ours[state]
        assert automaton.walk(0, path + [tokenizer.vocab_size + 5]) is None


def test_determinizing_regex_refused_by_its_state_count(tokenizer):
    """`[ab]*a[ab]{10}` has few positions (the edge estimate passes) but 2**11 DFA states, each walking every
    token in outlines-core's Index: refused after a one-byte Index counts them, before the full one."""
    from letterpress.structured.automaton import _vocabulary
    from letterpress.structured.size import estimate_edges

    regex = "[ab]*a[ab]{10}"
    assert estimate_edges(regex, _vocabulary(tokenizer, EOS[0], frozenset())[1]) < 100_000
    with pytest.raises(SchemaError, match=r"has 4,\d\d\d states.*--max-constraint-edges"):
        compile_regex(regex, tokenizer, EOS, limit=100_000)
    assert compile_regex("[ab]*a[ab]{3}", tokenizer, EOS, limit=100_000).num_states > 8


def test_json_object_compiles_within_the_limit_at_a_larger_vocabulary():
    """A 20,000-token synthetic byte-level vocabulary (benchmarks/structured.py vocab measures 262,144):
    json_object compiles under the default limit, and one canvas of random scores gives a JSON object."""
    from letterpress.structured import json_object_regex
    from letterpress.structured.automaton import _vocabulary
    from letterpress.structured.size import MAX_EDGES, estimate_edges

    sys.path.insert(0, str(ROOT))
    from benchmarks.structured import synthetic_tokenizer

    big = synthetic_tokenizer(20_000)
    assert big.vocab_size == 20_000 and big.eos_id == EOS[0]
    regex = json_object_regex()
    automaton = compile_regex(regex, big, EOS)  # the default limit
    assert estimate_edges(regex, _vocabulary(big, EOS[0], frozenset())[1]) <= MAX_EDGES
    assert 100_000 < automaton.src.numel() <= MAX_EDGES
    logp = torch.log_softmax(3 * torch.randn(12, big.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    tokens = best_path(logp, automaton, 0, EOS, None).tokens.tolist()
    assert isinstance(json.loads(big.decode(tokens[:tokens.index(EOS[0])] if EOS[0] in tokens else tokens)), dict)


def test_sentinel_only_narrows_classes():
    from letterpress.structured.automaton import SENTINEL
    from letterpress.structured.regex import narrow

    rewritten = narrow(r"a.b[^x\]]\D[^]a]\\.[a-c]", SENTINEL)
    assert rewritten == rf"a[^\n{SENTINEL}]b[^x\]{SENTINEL}][^\d{SENTINEL}][^]a{SENTINEL}]\\[^\n{SENTINEL}][a-c]"


def test_grammar_and_bad_regex_refused(tokenizer):
    with pytest.raises(SchemaError, match="grammar"):
        StructuredOutputsParams(grammar="root ::= 'a'").to_regex()
    # a syntax error is named as one (outlines-core alone says "Failed to build DFA")
    with pytest.raises(SchemaError, match="the regex is not valid: missing \\), unterminated subpattern"):
        compile_regex("(unclosed", tokenizer, EOS)
    with pytest.raises(SchemaError, match="the regex is not valid: bad character range z-a"):
        compile_regex("[z-a]", tokenizer, EOS)


# Nested bounded repeats multiply the automaton: ~3 * 10**8 edges here, minutes and tens of GB if compiled
HUGE_REGEX = r"(?:(?:[a-z]{0,100},){0,100};){0,30}"
HUGE_SCHEMA = {"type": "array", "maxItems": 100, "items": {"type": "array", "maxItems": 100, "items": {
    "type": "string", "maxLength": 100}}}
# a chain of $defs each used twice: a regex of 2**25 copies of the leaf if written out
DOUBLING = {"$defs": {"d0": {"type": "integer"}, **{f"d{i}": {"type": "array", "items": {"anyOf": [
    {"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}} for i in range(1, 26)}}, "$ref": "#/$defs/d25"}


def test_oversized_constraints_refused_before_compiling(tokenizer):
    from letterpress.structured.automaton import _cache

    for regex in (HUGE_REGEX, schema_regex(HUGE_SCHEMA)):
        with pytest.raises(SchemaError, match="too large to compile"):
            compile_regex(regex, tokenizer, EOS)
    with pytest.raises(SchemaError, match="too large"):
        schema_regex(DOUBLING)
    # the estimate is close to what compiling gives, and a repeated constraint is compiled once
    from letterpress.structured.automaton import _vocabulary
    from letterpress.structured.size import estimate_edges

    regex = r'"[^"\\]{0,40}"'
    automaton = compile_regex(regex, tokenizer, EOS)
    estimate = estimate_edges(regex, _vocabulary(tokenizer, EOS[0], frozenset())[1])
    assert 0.5 < estimate / automaton.src.numel() < 2
    assert compile_regex(regex, tokenizer, EOS) is automaton and len(_cache) <= 64


# ------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    folder = save_checkpoint(tmp_path_factory.mktemp("random_structured"), seed=3, canvas=CANVAS, vocab_size=4096,
                             max_position_embeddings=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    shutil.copy(ROOT / "letterpress" / "chat_templates" / "gemma4_tools.jinja", folder / "chat_template.jinja")
    return folder


@pytest.fixture(scope="module")
def llm(random_dir) -> LLM:
    return LLM(random_dir, max_num_seqs=8, max_model_len=1024)


def params(spec: StructuredOutputsParams | None, seed: int, tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": tokens, "max_denoising_steps": 3, "seed": seed,
                             "structured_outputs": spec, **kw})


def test_max_constraint_edges_is_a_per_engine_limit(random_dir, llm):
    """--max-constraint-edges / LLM(max_constraint_edges=): a lower limit refuses what the default compiles."""
    import argparse

    from letterpress.engine.args import add_engine_arguments, engine_options

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_options(parser.parse_args(["--max-constraint-edges", "1000"]))["max_constraint_edges"] == 1000
    spec = StructuredOutputsParams(regex=r"[a-z]{1,30}")
    eos = list(llm.defaults.eos_token_ids)
    assert llm.constraint(params(spec, seed=0, eos_token_ids=eos)) is not None
    small = LLM(random_dir, max_num_seqs=1, max_model_len=256, max_constraint_edges=1000)
    with pytest.raises(SchemaError, match="at most 1,000.*--max-constraint-edges"):
        small.constraint(params(spec, seed=0, eos_token_ids=eos))
    with pytest.raises(ConfigError, match="max_constraint_edges"):
        LLM(random_dir, max_constraint_edges=0)


def test_engine_schema_suite_with_a_random_model(llm):
    names = sorted(SUITE)
    outs = llm.generate(["Answer in JSON:"] * len(names),
                        [params(StructuredOutputsParams(json=SUITE[n]), seed=i, greedy=i % 2 == 1)
                         for i, n in enumerate(names)])
    for name, out in zip(names, outs):
        assert out.finish_reason in ("stop", "length"), (name, out.text)  # "length": complete at the budget
        jsonschema.validate(json.loads(out.text), SUITE[name])
    assert max(o.canvases for o in outs) >= 2  # some answers span canvases: the constraint carried over


def test_regex_longer_than_a_canvas_and_choice(llm):
    words = StructuredOutputsParams(regex=r"(?:[a-z]+ ){24,}end\.")
    choice = StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"])
    long, picked = llm.generate(["x", "y"], [params(words, 1, tokens=120), params(choice, 2)])
    assert long.canvases >= 2 and re.fullmatch(r"(?:[a-z]+ ){24,}end\.", long.text), long.text
    assert picked.text in ("alpha", "beta", "gamma delta") and picked.finish_reason == "stop"


def test_constrained_row_stops_on_the_constrained_distribution(llm, tokenizer):
    """The stopping rule reads the entropy over the tokens the automaton allows: a forced answer ("Q", then
    EOS: one allowed token at each position) stops as soon as its canvas is stable (step 2 with the default
    stability of 1), although the random model's own entropy stays high (its unconstrained row runs to the
    step limit)."""
    from letterpress.structured import Constraint

    forced = StructuredOutputsParams(regex="Q")
    plain, constrained = llm.generate(["x", "x"], [params(None, 4, tokens=16, max_denoising_steps=10),
                                                   params(forced, 4, tokens=16, max_denoising_steps=10)])
    assert plain.steps_per_canvas == [10] and constrained.steps_per_canvas == [2] and constrained.text == "Q"
    # the constrained entropy: over the allowed set along the path, 0 after its EOS
    automaton = compile_regex("[0-9]", tokenizer, EOS)
    constraint = Constraint(automaton, EOS, seed=0)
    logp = torch.log_softmax(torch.randn(4, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    best, _, entropy = constraint.paths(logp, 4, 0, 0, greedy=True)
    digits = automaton.allowed(0)
    expected = torch.distributions.Categorical(logits=logp[0, digits]).entropy()
    assert torch.allclose(entropy[0], expected) and entropy[1] == 0 and entropy[2:].eq(0).all()
    assert best[1] == EOS[0] and best[2:].eq(EOS[0]).all()


def test_unconstrained_row_unchanged_beside_a_constrained_one(llm):
    plain = params(None, 7, tokens=32)
    alone = llm.generate("hello", plain)[0]
    mixed = llm.generate(["hello", "hello"], [plain, params(StructuredOutputsParams(json_object=True), 8)])
    assert mixed[0].token_ids == alone.token_ids
    assert isinstance(json.loads(mixed[1].text), dict)


def test_same_seed_same_structured_output(llm):
    spec = StructuredOutputsParams(json=SUITE["nested"])
    a, b = (llm.generate("x", params(spec, 5))[0] for _ in range(2))
    assert a.token_ids == b.token_ids


def test_engine_refusals(llm):
    spec = StructuredOutputsParams(json=SUITE["nested"])
    with pytest.raises(RequestError, match="too few"):
        llm.generate("x", params(spec, 0, tokens=4))
    with pytest.raises(RequestError, match="ignore_eos"):
        llm.generate("x", params(spec, 0, ignore_eos=True))
    with pytest.raises(RequestError, match="structured_outputs"):
        llm.generate("x", params({"jsn": {}}, 0))


# ---------------------------------------------------------------------------------------------- HTTP
openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(llm):
    from letterpress.server.app import ServerConfig

    from .live_server import KEY, MODEL, LiveServer

    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY))
    yield openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    live.stop()


def chat(client, **kwargs):
    return client.chat.completions.create(model="letterpress-default", max_tokens=80, seed=0,
                                          extra_body={"max_denoising_steps": 3, **kwargs.pop("extra_body", {})},
                                          **kwargs)


def test_http_response_format_json_schema(client):
    schema = SUITE["nested"]
    resp = chat(client, messages=ASK, response_format={
        "type": "json_schema", "json_schema": {"name": "user", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    resp = chat(client, messages=ASK, response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_http_completions_structured_outputs(client):
    resp = client.completions.create(model="letterpress-default", prompt="Pick:", max_tokens=16, seed=1,
                                     extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert resp.choices[0].text in ("red", "green")
    resp = client.completions.create(model="letterpress-default", prompt="Code:", max_tokens=16, seed=1,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", resp.choices[0].text)


def test_http_tool_choice_required_and_named(client):
    schemas = {"weather": WEATHER["function"]["parameters"], "clock": TIME["function"]["parameters"]}
    required = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0].function
    jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    for name in ("weather", "clock"):
        named = chat(client, messages=ASK, tools=[WEATHER, TIME],
                     tool_choice={"type": "function", "function": {"name": name}})
        calls = named.choices[0].message.tool_calls
        assert named.choices[0].finish_reason == "tool_calls" and calls and all(c.function.name == name for c in calls)
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), schemas[name])


def test_http_streamed_named_tool_call(client):
    chunks = list(chat(client, messages=ASK, tools=[WEATHER, TIME], stream=True,
                       tool_choice={"type": "function", "function": {"name": "clock"}}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "clock"
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_http_oversized_constraints_are_400_and_health_answers(client):
    """Refused from the size estimate, before outlines-core starts; the server keeps answering meanwhile."""
    import concurrent.futures
    import time

    import httpx

    base = str(client.base_url).removesuffix("/v1/")
    bodies = [{"structured_outputs": {"regex": HUGE_REGEX}},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE_SCHEMA}}},
              {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": DOUBLING}}}]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        start = time.monotonic()
        futures = [pool.submit(chat_raw, client, body) for body in bodies]
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        for future in futures:
            status, error = future.result(timeout=60)
            assert status == 400 and "too large" in error["message"], error
        assert time.monotonic() - start < 30  # compiling them would take minutes (generous, non-flaky)
    resp = chat(client, messages=ASK, extra_body={"structured_outputs": {"regex": "[a-z]{0,20}"}})  # still fine
    assert re.fullmatch("[a-z]{0,20}", resp.choices[0].message.content)


def chat_raw(client, extra: dict) -> tuple[int, dict]:
    import httpx

    body = {"model": "letterpress-default", "messages": ASK, "max_tokens": 80, "max_denoising_steps": 3, **extra}
    r = httpx.post(str(client.base_url) + "chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {client.api_key}"})
    return r.status_code, r.json().get("error", {})


@pytest.mark.parametrize("kwargs,match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                                         "uniqueItems": True}}}},
     "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "invalid JSON schema"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= 'a'"}}}, "grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "(a"}}}, "the regex is not valid"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_http_invalid_constraints_are_400(client, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match):
        chat(client, messages=ASK, **kwargs)


def test_concurrent_requests_for_one_constraint_compile_it_once(tokenizer, monkeypatch):
    import concurrent.futures

    from letterpress.structured import automaton as module

    calls = []
    real = module._compile
    monkeypatch.setattr(module, "_compile", lambda *a: calls.append(1) or real(*a))
    regex = "[A-Z]{2}-[0-9]{1,7}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        automata = list(pool.map(lambda _: compile_regex(regex, tokenizer, EOS), range(8)))
    assert len(calls) == 1 and all(a is automata[0] for a in automata)


def test_a_seeded_constrained_request_is_the_same_in_every_process():
    """The constraint's own draws (re-noising what its bound rejects) come from a seed derived from the request's
    seed alone: Python's per-process string hashing (PYTHONHASHSEED) once entered it, and the same request gave
    different answers in different processes."""
    import os
    import subprocess

    script = (
        "from letterpress import LLM, SamplingParams\n"
        "from letterpress.structured import StructuredOutputsParams as S\n"
        "schema = {'type': 'object', 'properties': {'name': {'type': 'string', 'maxLength': 12}, 'city': {'type':"
        " 'string', 'maxLength': 12}, 'year': {'type': 'integer'}}, 'required': ['name', 'city', 'year']}\n"
        "out = LLM(MODEL).generate('Convert to JSON: name=Ada, city=Paris, year=1843', SamplingParams(seed=3,"
        " max_new_tokens=60, structured_outputs=S(json=schema)))[0]\n"
        "print(out.token_ids)\n")
    root = Path(__file__).resolve().parent.parent
    script = f"MODEL = {str(root / 'letterpress' / 'assets' / 'tiny_tasks')!r}\n" + script
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]


def test_chat_markers_are_allowed_only_where_the_constraint_writes_them():
    """The chat answer's constraint allows the Gemma markers (a tool call, a thought). Spelled as their text,
    the single token <|tool_call> was allowed wherever "<", "|" and letters were: inside a JSON string of a
    response_format, where the chat parser then split the answer (half the JSON came back as reasoning).
    Now a marker token is allowed only where the regex writes that marker."""
    from letterpress.server.structured import CHAT_MARKERS
    from letterpress.structured import tool_call_regex

    tok = Tokenizer.from_dir(ROOT / "letterpress" / "assets" / "tiny_tasks")  # has the markers as single ids
    markers = {m: tok.encode(m) for m in CHAT_MARKERS}
    assert all(len(ids) == 1 for ids in markers.values())
    fmt = compile_regex(r'\{"a":"[^"]*"\}', tok, EOS, frozenset(CHAT_MARKERS))
    state = 0
    for t in tok.encode('{"a":"'):
        state = fmt.next_state(state, t)
    inside = set(fmt.allowed(state).tolist())
    assert tok.encode("x")[0] in inside and not inside & {ids[0] for ids in markers.values()}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]
    call = compile_regex(tool_call_regex(tools), tok, EOS, frozenset(CHAT_MARKERS))
    assert markers["<|tool_call>"][0] in set(call.allowed(0).tolist())


def test_tools_with_auto_beside_a_response_format_may_still_call_a_tool():
    """An agent with tools and an output type sends both: the answer is a tool call or the format, as OpenAI
    answers; the format alone (before) left the model no way to call a tool, and nothing said so."""
    from letterpress.server.chat import render_chat
    from letterpress.server.schemas import ChatCompletionRequest

    tok = Tokenizer.from_dir(ROOT / "letterpress" / "assets" / "tiny_tasks")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "Current time in Riga?"}], tools=tools,
                                 response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    regex = render_chat(tok, body)[1].structured.regex
    assert re.fullmatch(regex, '<|tool_call>call:get_time{city:<|"|>Riga<|"|>}<tool_call|>')
    assert re.fullmatch(regex, '{"answer":"It is noon"}')
    none = ChatCompletionRequest(**{**body.model_dump(exclude_none=True), "tool_choice": "none"})
    assert not re.fullmatch(render_chat(tok, none)[1].structured.regex,
                            '<|tool_call>call:get_time{city:<|"|>Riga<|"|>}<tool_call|>')


def test_a_tool_without_parameters_is_called_with_none():
    """OpenAI: a function declared without `parameters` takes no arguments; a required call of it was allowed
    any object, and the model invented {"city": ...} for a function that takes nothing."""
    from letterpress.structured import tool_call_regex

    regex = tool_call_regex([{"type": "function", "function": {"name": "noargs"}}])
    assert re.fullmatch(regex, "<|tool_call>call:noargs{}<tool_call|>")
    assert not re.fullmatch(regex, '<|tool_call>call:noargs{city:<|"|>x<|"|>}<tool_call|>')
