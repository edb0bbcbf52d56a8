"""The generated tasks of the default model's recipe: deterministic, exact, in the Gemma 4 chat format, and
held-out examples that never occur in training."""

from __future__ import annotations

import json
import random

import pytest

from letterpress.chat_output import parse_output
from letterpress.tokenizer import Tokenizer
from letterpress.train import tasks as T
from letterpress.train.recipes_tasks import (TASKS_CANVAS, TASKS_DIR, judge, render, stop_ids, task_examples,
                                             training_tasks)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TASKS_DIR)


def test_families_are_seeded_and_every_family_is_drawn():
    a, b = T.make_tasks(300, 5), T.make_tasks(300, 5)
    assert [(t.prompt_key, t.answer) for t in a] == [(t.prompt_key, t.answer) for t in b]
    assert {t.family for t in a} == set(T.FAMILIES)
    assert [t.answer for t in T.make_tasks(50, 6)] != [t.answer for t in a[:50]]


def test_family_weights_set_the_mix_and_an_unweighted_stream_is_unchanged():
    from collections import Counter

    assert [t.prompt_key for t in T.make_tasks(40, 5, weights=None)] == [t.prompt_key for t in T.make_tasks(40, 5)]
    counts = Counter(t.family for t in T.make_tasks(3000, 5, weights={"arithmetic": 3.0, "case": 1.0}))
    assert set(counts) == {"arithmetic", "case"} and 2.5 < counts["arithmetic"] / counts["case"] < 3.5
    with pytest.raises(ValueError, match="unknown task families"):
        T.make_tasks(1, 5, weights={"poetry": 1.0})


def test_the_focus_recipe_draws_the_weak_families_most_and_the_benchmark_excludes_its_prompts():
    from collections import Counter

    from letterpress.train.recipes_tasks import (FOCUS_WEIGHTS, OPEN_STAGE_SHARE, SHORT_WEIGHTS,
                                                 open_training_tasks, training_prompts)

    focus = training_tasks(0, 2000, weights=FOCUS_WEIGHTS)
    short = training_tasks(0, 2000, weights=SHORT_WEIGHTS)
    counts = Counter(t.family for t in focus)
    assert counts["sort_dedup"] > 4 * counts["tool_call"]
    assert Counter(t.family for t in short).most_common(1)[0][0] == "arithmetic"
    seen = training_prompts(2000)
    opened = open_training_tasks(0, round(2000 * OPEN_STAGE_SHARE), FOCUS_WEIGHTS)  # the open stage's own
    assert {t.prompt_key for t in focus + short + training_tasks(0, 2000) + opened} == seen


@pytest.mark.parametrize("values", [T.POOLED, T.OPEN], ids=["pooled", "open"])
@pytest.mark.parametrize("family", sorted(T.FAMILIES))
def test_answers_are_right(family, values):
    """Spot checks that the expected answers are what the instruction asks for."""
    rng = random.Random(1)
    for _ in range(50):
        task = T.FAMILIES[family](rng, "train", values)
        text = task.messages[0]["content"]
        if family == "arithmetic":
            a, op, b = text.rstrip("?.=").split()[-3:]
            assert int(task.answer) == eval(f"{int(a)} {op} {int(b)}")
        elif family == "kv_to_json":
            for k, v in json.loads(task.answer).items():
                assert f"{k}={json.dumps(v) if isinstance(v, bool) else v}" in text
        elif family == "sort_dedup":
            items = task.answer.split(", ")
            assert len(set(items)) == len(items) and all(i in text for i in items)
        elif family == "tool_call":
            assert task.call["name"] in {t["function"]["name"] for t in task.tools}
        elif family == "case":
            assert task.answer and task.answer.replace("_", "").replace("-", "").replace(" ", "").lower() in \
                text.replace("_", "").replace("-", "").replace(" ", "").lower()


def test_pooled_values_draw_what_the_recorded_runs_trained_on():
    """POOLED is the draws every recorded run used, call for call: the first tasks of the seed-0 stream."""
    first = [t.messages[-1]["content"] for t in training_tasks(0, 3)]
    assert first == ["Start a 5 minute timer.",
                     "Turn these key=value pairs into a JSON object:\nname=Tom, active=false, role=owner, city=Toronto",
                     "key=value to JSON: id=595, name=Ivan, role=owner, active=false"]


def test_open_values_are_made_up_and_copied_into_the_answer():
    opened = T.make_tasks(300, 7, families=("kv_to_json", "extract", "tool_call"), values=T.OPEN)
    names = {v for t in opened if t.family == "kv_to_json" for k, v in json.loads(t.answer).items() if k == "name"}
    assert len(names) > 10 and not names & set(T.NAMES)
    cities = {t.call["arguments"].get("city") for t in opened if t.family == "tool_call"} - {None}
    assert cities and not cities & set(T.CITIES)
    years = [json.loads(t.answer)["year"] for t in opened if t.family == "kv_to_json" and "year" in t.answer]
    assert min(years) < 1990  # beyond the pooled range
    for t in opened:
        if t.family == "extract":
            assert all(str(v) in t.messages[0]["content"] for v in json.loads(t.answer).values())


def test_held_out_examples_are_not_in_training_and_phrasings_differ():
    seen = {t.prompt_key for t in training_tasks(0, n=5000)}
    held = T.held_out_tasks("case", 50, exclude=seen)
    assert len({t.prompt_key for t in held}) == 50 and not seen & {t.prompt_key for t in held}
    # the held-out wording is the family's last template, never drawn for training
    unseen = T.held_out_tasks("case", 20, "held_out")
    assert all(t.messages[0]["content"].startswith("What is ") for t in unseen)
    assert not any(t.messages[0]["content"].startswith("What is ") for t in T.make_tasks(500, 3, families=("case",)))


def test_tool_call_target_is_what_the_template_writes_and_the_parser_reads(tok):
    rng = random.Random(2)
    for _ in range(20):
        task = T.tool_call(rng)
        call = {"id": "c1", "type": "function", "function": task.call}
        full = tok.apply_chat_template(task.messages + [{"role": "assistant", "content": "", "tool_calls": [call]}],
                                       add_generation_prompt=False, tools=task.tools)
        assert full.endswith("<|turn>model\n" + task.answer)
        out = parse_output(task.answer.removesuffix("<|tool_response>"))
        assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [(task.call["name"], task.call["arguments"])]


def test_tool_answer_prompt_ends_at_the_tool_response(tok):
    task = T.tool_answer(random.Random(3))
    prompt, target = render(task, tok)
    assert prompt.endswith("<tool_response|>") and "<|tool>declaration:" in prompt
    assert target == task.answer + "<turn|>"


def test_examples_fit_one_canvas_and_end_with_a_stop_token(tok):
    tasks = T.make_tasks(400, 9)
    examples = task_examples(tasks, tok, plain_share=0.15)
    stops = set(stop_ids(tok))
    assert all(len(e.target) < TASKS_CANVAS for e in examples)
    chat = [e for t, e in zip(tasks, examples) if e.prompt[1] == tok.token_to_id("<|turn>") or t.tools]
    assert chat and all(e.target[-1] in stops for e in chat)
    # the Gemma 4 control tokens are single ids
    for marker in ("<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", '<|"|>'):
        assert len(tok.encode(marker)) == 1
    assert sum(e.prompt[1] != tok.token_to_id("<|turn>") for e in examples) >= 30  # plain prompts too


def test_a_value_is_one_token_wherever_it_stands(tok):
    """Copy-friendly tokenization: a word of the task pools has the same single id after a space, '=', a quote
    or a newline, so copying it from the prompt is finding that id."""
    for word in ("Madrid", "Riga", "owner", "banana", "Emma", "account"):
        ids = {tuple(tok.encode(text, add_special_tokens=False)[-1:]) for text in
               (f" {word}", f"city={word}", f'"{word}', f"\n{word}")}
        assert len(ids) == 1 and len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_judge_accepts_exactly_the_expected_answer():
    rng = random.Random(4)
    call = T.tool_call(rng)
    assert judge(call, call.answer.removesuffix("<|tool_response>"))
    assert not judge(call, call.answer.replace("call:", "call:x"))
    text = T.date_format(rng)
    assert judge(text, text.answer) and not judge(text, text.answer + ".")


def test_column_steps_spell_out_every_sum_and_difference():
    """The arithmetic probe's thought: for every pair of operands the family draws, the answer is the steps'
    digits read back (the last step's result, then each earlier step's last digit, most significant first)."""
    from letterpress.train.tasks import column_steps

    assert column_steps(38, 57, "+") == "8+7=15 3+5+1=9"
    assert column_steps(52, 45, "-") == "12-5=7 5-1-4=0"
    assert column_steps(7, 3, "*") == ""
    for a in range(1, 100):
        for b in range(1, 100):
            for op, result in (("+", a + b), ("-", a - b)):
                if result < 0:
                    continue
                results = [step.split("=")[1] for step in column_steps(a, b, op).split()]
                digits = results[-1] + "".join(r[-1] for r in reversed(results[:-1]))
                assert int(digits) == result, (a, op, b, column_steps(a, b, op))


def test_a_worked_task_writes_its_thought_before_the_answer_and_is_judged_on_the_answer():
    from letterpress.train.recipes_tasks import RECIPES, _renderer, judge, render

    task = T.worked_arithmetic(random.Random(3))
    _, target = render(task, _renderer())
    assert target == f"<|channel>thought\n{task.thought}<channel|>{task.answer}<turn|>"
    assert judge(task, target.removesuffix("<turn|>")) and not judge(task, "<|channel>thought\n1<channel|>x")
    assert {"arith-direct", "arith-worked"} <= set(RECIPES)


def test_the_aligned_and_padded_thoughts_hold_the_answer_at_fixed_width():
    """arith-aligned writes '038+057=095' (the answer is its last three digits without leading zeros);
    sort-padded writes a number list's unique values in prompt order, zero-padded, and nothing for words."""
    from letterpress.train.recipes_tasks import PROBES, _renderer, judge, render

    assert T.aligned_steps(38, 57, "+") == "038+057=095" and T.aligned_steps(12, 9, "*") == "012*009=108"
    rng = random.Random(5)
    for _ in range(300):
        task = T.aligned_arithmetic(rng)
        assert len(task.thought) == 11 and str(int(task.thought[-3:])) == task.answer
    task = T.Task("sort_dedup", [{"role": "user", "content": "Deduplicate and sort (ascending): 47, 5, 23, 47"}],
                  "5, 23, 47")
    assert T.padded_unique(task) == "47 05 23"
    assert T.padded_unique(T.Task("sort_dedup", [{"role": "user", "content": "Sort: b, a"}], "a, b")) is None
    rng = random.Random(6)
    drawn = [T.padded_sort_dedup(rng) for _ in range(200)]
    assert {t.thought is None for t in drawn} == {True, False}
    assert all(t.thought is None or sorted(map(int, t.thought.split())) == sorted(map(int, t.answer.split(", ")))
               for t in drawn)
    # the same draws as the family: a probe's stream is the family's with a thought added
    assert [T.padded_sort_dedup(random.Random(i)).prompt_key for i in range(20)] == \
        [T.sort_dedup(random.Random(i)).prompt_key for i in range(20)]
    task = next(t for t in drawn if t.thought)
    _, target = render(task, _renderer())
    assert judge(task, target.removesuffix("<turn|>"))
    assert PROBES["arith-aligned"].exclude_hook_prompts and PROBES["sort-padded"].family == "sort_dedup"
    assert {name for name, (family, _) in T.THOUGHTS.items()} == {"column", "aligned", "padded"}


def test_the_times_table_probe_draws_every_product_and_nothing_else():
    from letterpress.train.recipes_tasks import PROBES, RECIPES

    rng = random.Random(7)
    drawn = [T.times_table(rng) for _ in range(2000)]
    assert {T.arithmetic_operands(t)[:2] for t in drawn} == set(T.TIMES_TABLE) and len(T.TIMES_TABLE) == 88
    assert all(t.answer == str(a * b) for t in drawn for a, b, _ in [T.arithmetic_operands(t)])
    assert "times-direct" in RECIPES and RECIPES["times-direct"].evaluate is None
    assert PROBES["times-direct"].family == "arithmetic" and not PROBES["times-direct"].hook


def test_the_capacity_probes_are_arith_aligned_on_a_wider_or_deeper_model():
    """Same stream and hyperparameters as arith-aligned; only the shape differs (and the default's is unchanged)."""
    from letterpress.train.recipes_tasks import PROBES, RECIPES, tasks_config

    base = RECIPES["arith-aligned"]
    wide, deep = (RECIPES[f"arith-aligned-{k}"] for k in ("wide", "deep"))
    assert base.model_config == tasks_config() and tasks_config()["text_config"]["head_dim"] == 32
    assert wide.model_config["text_config"]["hidden_size"] == 256 and wide.model_config["text_config"]["head_dim"] == 64
    assert deep.model_config["text_config"]["num_hidden_layers"] == 12
    assert deep.model_config["text_config"]["hidden_size"] == 128
    for name in ("arith-aligned-wide", "arith-aligned-deep"):
        assert PROBES[name].draw is PROBES["arith-aligned"].draw and PROBES[name].exclude_hook_prompts
        assert RECIPES[name].hyperparameters == base.hyperparameters


def test_a_probe_trains_on_its_family_only_and_never_on_the_prompts_it_is_scored_on():
    import dataclasses

    from letterpress.tokenizer import Tokenizer
    from letterpress.train.recipes_tasks import (PROBE_HELD_OUT, PROBES, TASKS_DIR, Probe, hook_tasks, probe_data,
                                                 training_prompts)

    tok = Tokenizer.from_dir(TASKS_DIR)

    def requests(probe: Probe) -> set[str]:  # the user turns of the probe's training stream (a fifth of it)
        train, _ = probe_data(tok, 0, dataclasses.replace(probe, stream=probe.stream // 5))
        texts = (tok.decode(ex.prompt, skip_special_tokens=False) for ex in train)
        return {t.removeprefix("<bos>").split("<|turn>user\n")[-1].split("<turn|>")[0] for t in texts}

    assert all(("ort" in r or "Deduplicate" in r) for r in requests(PROBES["sort-direct"]))  # its family only
    # arithmetic has few distinct prompts, so a stream holds most of them unless they are taken out
    held = {t.messages[0]["content"] for t in T.held_out_tasks("arithmetic", PROBE_HELD_OUT, exclude=training_prompts())}
    hook = {t.messages[0]["content"] for t in hook_tasks("arithmetic")}
    kept = requests(Probe("arithmetic", T.arithmetic, "", exclude_hook_prompts=False))
    excluded = requests(Probe("arithmetic", T.arithmetic, ""))
    assert not held & kept and not held & excluded
    assert len(hook & kept) > 5 and not hook & excluded
    assert PROBES["sort-direct"].exclude_hook_prompts and not PROBES["arith-direct"].exclude_hook_prompts


def test_real_and_pieces_values_are_words_outside_every_pool():
    """REAL draws real names, cities and words no training stream has (what `--values real` scores); PIECES
    joins made-up words from the tokenizer's own pieces; both are copied into the answer."""
    from letterpress.train.recipes_tasks import PIECES, tokenizer_pieces

    pools = {w.lower() for w in T.NAMES + T.CITIES + T.ITEMS + T.WORDS + T.KEYS + T.ROLES}
    assert not pools & {w.lower() for w in T.REAL_NAMES + T.REAL_CITIES + T.REAL_WORDS}
    real = T.make_tasks(300, 7, families=("kv_to_json", "tool_call"), values=T.REAL)
    names = {v for t in real if t.family == "kv_to_json" for k, v in json.loads(t.answer).items() if k == "name"}
    cities = {t.call["arguments"].get("city") for t in real if t.family == "tool_call"} - {None}
    assert len(names) > 5 and names <= set(T.REAL_NAMES) and cities and cities <= set(T.REAL_CITIES)

    pieces = set(tokenizer_pieces())
    assert len(pieces) > 500 and all(p.isalpha() and p.islower() for p in pieces)
    made = T.make_tasks(300, 7, families=("kv_to_json", "sort_dedup"), values=PIECES)
    items = {i for t in made if t.family == "sort_dedup" for i in t.answer.split(", ") if not i.isdigit()}
    assert len(items) > 50 and len(items & pools) < 0.1 * len(items)  # a piece may be a pool word ("apple")
    for t in made:
        if t.family == "kv_to_json":
            for k, v in json.loads(t.answer).items():
                assert f"{k}={json.dumps(v) if isinstance(v, bool) else v}" in t.messages[0]["content"]


def test_a_stage_with_its_own_stream_sees_new_tasks_and_none_the_benchmark_scores(monkeypatch, tok):
    import letterpress.train.recipes_tasks as R

    monkeypatch.setattr(R, "TASKS_STREAM", 1000)
    first = T.held_out_tasks("case", 30)  # what the benchmark scores first, pool values
    avoid = frozenset(t.prompt_key for t in first)
    own, _ = R.tasks_data(tok, 0, R.FOCUS_WEIGHTS, 0.5, (T.OPEN, R.PIECES), stream=R.COPY_STREAM, avoid=lambda: avoid)
    old, _ = R.tasks_data(tok, 0, R.FOCUS_WEIGHTS, 0.5)
    decode = tok._backend.decode_batch
    own_text = set(decode([list(e.prompt) for e in own], skip_special_tokens=False))
    old_text = set(decode([list(e.prompt) for e in old], skip_special_tokens=False))
    assert len(own_text & old_text) < 0.2 * len(own_text)  # a fresh stream (short pooled prompts recur)
    assert not any(t.messages[0]["content"] in p for t in first for p in own_text)
    # the stage itself leaves out every held-out and validation example default_model.py can score
    keys = R.benchmark_prompts(5)
    assert {t.prompt_key for t in T.held_out_tasks("sort_dedup", 5, exclude=R.training_prompts(),
                                                   values=T.REAL)} <= keys


def test_the_times_stage_adds_a_share_of_products_and_leaves_other_streams_unchanged(monkeypatch, tok):
    import letterpress.train.recipes_tasks as R

    monkeypatch.setattr(R, "TASKS_STREAM", 1000)
    products = {f"{a} * {b}" for a, b in T.TIMES_TABLE}
    decode = tok._backend.decode_batch

    def share_of_products(data) -> float:
        texts = decode([list(e.prompt) for e in data], skip_special_tokens=False)
        return sum(any(p in t for p in products) for t in texts) / len(texts)

    times, _ = R.tasks_data(tok, 0, R.POLISH_WEIGHTS, 0.5, (T.OPEN, R.PIECES), stream=R.COPY_STREAM,
                            times_share=R.TIMES_SHARE)
    polish, _ = R.tasks_data(tok, 0, R.POLISH_WEIGHTS, 0.5, (T.OPEN, R.PIECES), stream=R.COPY_STREAM)
    assert share_of_products(times) > R.TIMES_SHARE > 2 * share_of_products(polish)
    again, _ = R.tasks_data(tok, 0, R.POLISH_WEIGHTS, 0.5, (T.OPEN, R.PIECES), stream=R.COPY_STREAM, times_share=0.0)
    assert [e.prompt for e in again] == [e.prompt for e in polish]  # a zero share draws nothing extra
    assert "tiny-tasks-times" in R.RECIPES


def test_the_units_stages_draw_units_twice_as_often_as_the_polish_stage():
    import letterpress.train.recipes_tasks as R

    assert "tiny-tasks-units" in R.RECIPES and "tiny-tasks-units-times" in R.RECIPES
    n = 1000  # of the stream's pooled half (OPEN-valued tasks are never units)
    units = sum(t.family == "units" for t in R.training_tasks(R.COPY_STREAM, n, R.UNITS_WEIGHTS))
    polish = sum(t.family == "units" for t in R.training_tasks(R.COPY_STREAM, n, R.POLISH_WEIGHTS))
    assert 1.6 < units / polish < 2.2  # 6 / 22.25 of the draws against 3 / 19.25
    assert {f: w for f, w in R.UNITS_WEIGHTS.items() if f != "units"} == \
        {f: w for f, w in R.POLISH_WEIGHTS.items() if f != "units"}


def test_the_compute_probe_is_arith_direct_with_more_examples_a_step_and_every_answer_in_its_canvas():
    """Same family draws and model shape as arith-direct; only the canvas, the batch and the stream differ, and
    the shorter canvas still holds every answer with its end marker and the loss's EOS."""
    import random

    from letterpress.tokenizer import Tokenizer
    from letterpress.train.recipes_tasks import PROBES, RECIPES, TASKS_DIR, task_examples, tasks_config

    tok = Tokenizer.from_dir(TASKS_DIR)
    for big, base, canvas, batch in (("arith-direct-big", "arith-direct", 8, 128),):
        assert PROBES[big].draw is PROBES[base].draw and PROBES[big].stream == 10 * PROBES[base].stream
        assert RECIPES[big].model_config == tasks_config(canvas_length=canvas)
        assert RECIPES[big].hyperparameters["batch_size"] == batch
        examples = task_examples([PROBES[big].draw(random.Random(i)) for i in range(3000)], tok, 0.15)
        assert max(len(e.target) for e in examples) + 1 <= canvas


def test_the_gpu_probes_are_registered_and_calibrate_on_a_sibling_with_the_same_step(tmp_path, monkeypatch):
    """benchmarks/gpu_tiny_tasks.py cannot rot where a CPU can check it (its dry run takes minutes, too long for
    the suite): every probe it runs is a registered recipe of its family, and the sibling that times its steps
    draws the same family on a model of the same shape and canvas."""
    import importlib.util
    import sys
    from pathlib import Path

    from letterpress.train.recipes_tasks import PROBES, RECIPES, tasks_config

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_tiny_tasks.py"
    spec = importlib.util.spec_from_file_location("gpu_tiny_tasks", path)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # its dataclass looks its module up there
    spec.loader.exec_module(gpu)
    for name, probe in gpu.PROBES.items():
        sibling, *flags = probe.calibration
        assert PROBES[name].family == PROBES[sibling].family == probe.family
        assert PROBES[name].draw is PROBES[sibling].draw
        canvas = RECIPES[name].model_config["canvas_length"]
        sibling_canvas = (int(flags[flags.index("--canvas-length") + 1]) if flags
                          else RECIPES[sibling].model_config["canvas_length"])
        assert canvas == sibling_canvas
        assert RECIPES[name].model_config == tasks_config(canvas_length=canvas)
    # the step time it plans with: the median after the warm-up quarter
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "seconds": s}) + "\n" for i, s in enumerate([9, 9, 1, 2, 3, 1, 1, 2])))
    assert gpu.step_seconds(metrics) == 1.5
