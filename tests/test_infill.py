"""Clamped canvases (issue #6): the sampler's clamp semantics, infill and edit through the engine (alone and
batched beside unclamped rows), the server's `suffix` and `/v1/edits`, the CLI, and the errors. Models have
random weights, so we test what must hold for any weights: pinned tokens, batch invariance, shapes, errors."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.errors import RequestError
from letterpress.fast_sampling import fused_denoise_step
from letterpress.infill import (
    _span_tokens_scan,
    finish_infill,
    plan_edit,
    plan_infill,
    search_lengths,
    span_tokens,
)
from letterpress.sampling import (
    Clamp,
    GeneratorDraws,
    denoise_step,
    entropy_bound_accept,
    stack_clamps,
    token_entropy,
)

from .reference import build_reference

FAST = SamplingParams(seed=0, max_denoising_steps=3)
PREFIX = "def add(a, b):\n    total = a + b"
SUFFIX = "\n    return total\n\n\ndef sub(a, b):\n    return a - b\n"
TEXT = "def add(a, b):\n    total = a + b\n    return total\n"


# ---------------------------------------------------------------------------------------------- the sampler
def step(kind: str, logits: torch.Tensor, clamp: list[Clamp | None], seed: int = 0, greedy: bool = False):
    rows, length, _ = logits.shape
    tokens, mask = stack_clamps(clamp, length, "cpu")
    fn = denoise_step if kind == "plain" else fused_denoise_step
    draws = [GeneratorDraws(seed + r) for r in range(rows)]
    return fn(logits.clone(), torch.full((rows,), 0.7), torch.full((rows,), 0.5), draws, [0] * rows, [0] * rows,
              [greedy] * rows, clamp_tokens=tokens, clamp_mask=mask)


def adversarial_logits(rows: int, length: int, vocab: int, pinned: list[int], prefer: int) -> torch.Tensor:
    """Mildly peaked logits everywhere, and at the pinned positions a huge logit for `prefer`: those are the
    lowest-entropy positions, which an unclamped sampler would accept first, with `prefer` as the token."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, length, vocab, generator=g) * 3
    logits[:, pinned, :] = 0.0
    logits[:, pinned, prefer] = 60.0
    return logits


@pytest.mark.parametrize("kind", ["plain", "fused"])
@pytest.mark.parametrize("greedy", [False, True])
def test_sampler_never_accepts_over_a_clamp(kind, greedy):
    length, vocab, pinned = 12, 50, [0, 3, 4, 9]
    logits = adversarial_logits(3, length, vocab, pinned, prefer=7)
    clamp = Clamp.of([11 + i if i in pinned else None for i in range(length)])
    out = step(kind, logits, [clamp, None, clamp], greedy=greedy)
    for r in (0, 2):
        assert not out.accept_mask[r, pinned].any()
        assert out.next_canvas[r, pinned].tolist() == [11, 14, 15, 20]
        assert out.argmax[r, pinned].tolist() == [11, 14, 15, 20]
        # the budget ranks free positions only: the lowest-entropy free one is always accepted
        entropy = token_entropy(logits[r] / 0.7)
        entropy[pinned] = float("inf")
        assert out.accept_mask[r, int(entropy.argmin())]
        free = [i for i in range(length) if i not in pinned]
        assert out.mean_entropy[r].item() == pytest.approx(token_entropy(logits[r, free] / 0.7).mean().item(), rel=1e-5)
    # the unclamped row beside them is bit-identical to a call without any clamp
    alone = step(kind, logits, [None, None, None], greedy=greedy)
    assert out.accept_mask[1, pinned].all()  # and, unclamped, it takes the adversarial proposals
    for name in ("next_canvas", "argmax", "accept_mask", "mean_entropy"):
        assert torch.equal(getattr(out, name)[1], getattr(alone, name)[1]), name
    assert torch.equal(out.processed_logits, alone.processed_logits)


def test_acceptance_budget_counts_free_positions_only():
    entropy = torch.tensor([[0.0, 0.05, 0.06, 0.3]])
    assert entropy_bound_accept(entropy, 0.1).tolist() == [[True, True, True, False]]
    clamped = torch.tensor([[True, False, False, False]])
    assert entropy_bound_accept(entropy, 0.1, clamped).tolist() == [[False, True, True, False]]
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert not entropy_bound_accept(entropy, 0.1, everything).any()


def test_fully_clamped_row_is_certain():
    logits = adversarial_logits(1, 6, 20, [0], prefer=3)
    out = step("plain", logits, [Clamp.of([1, 2, 3, 4, 5, 6])])
    assert out.mean_entropy.item() == 0.0 and out.next_canvas.tolist() == [[1, 2, 3, 4, 5, 6]]


def test_search_lengths():
    assert search_lengths(32) == [4, 7, 11, 19, 32]
    assert search_lengths(1) == [1] and search_lengths(8)[-1] == 8


# ------------------------------------------------------------------------------------- the engine, token ids
@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("infill_ref")
    build_reference(folder, canvas_length=16, weight_std=0.05, embed_std=0.5)
    return folder


@pytest.fixture(scope="module", params=["plain", "fast"])
def ref_llm(ref_folder, request):
    return LLM(ref_folder, max_num_seqs=8, max_model_len=160, impl=request.param)


def ref_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 512, (4 + 3 * i,), generator=g).tolist() for i in range(n)]


def random_clamp(seed: int, length: int = 16) -> Clamp:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(length, generator=g) < 0.5
    return Clamp(torch.randint(3, 512, (length,), generator=g), mask)


def test_clamped_rows_batch_with_unclamped_rows(ref_llm):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, seed=3, max_denoising_steps=5)
    prompts = ref_prompts(4)
    clamps = {0: random_clamp(0), 2: random_clamp(1)}
    solo = [ref_llm.generate(prompts[i], params)[0].token_ids for i in (1, 3)]  # the "before": no clamped rows
    rows = [ref_llm.make_request(p, params, clamps=[clamps[i]] if i in clamps else None) for i, p in enumerate(prompts)]
    together = ref_llm.run(rows)
    for i, clamp in clamps.items():
        tokens = torch.tensor(together[i].token_ids)
        assert torch.equal(tokens[clamp.mask], clamp.tokens[clamp.mask])
        alone = ref_llm.run([ref_llm.make_request(prompts[i], params, clamps=[clamp])])[0]
        assert alone.token_ids == together[i].token_ids  # batch-invariant with clamps too
    assert [together[1].token_ids, together[3].token_ids] == solo


def test_clamp_on_a_later_canvas(ref_llm):
    params = SamplingParams(max_new_tokens=32, ignore_eos=True, seed=4, max_denoising_steps=4)
    clamp = random_clamp(2)
    free = ref_llm.generate(ref_prompts(1)[0], params)[0]
    out = ref_llm.run([ref_llm.make_request(ref_prompts(1)[0], params, clamps=[None, clamp])])[0]
    assert out.token_ids[:16] == free.token_ids[:16]  # the first canvas is untouched
    assert torch.equal(torch.tensor(out.token_ids[16:])[clamp.mask], clamp.tokens[clamp.mask])
    assert len(out.final_entropy) == 2


def test_bad_clamps(ref_llm):
    with pytest.raises(RequestError, match="16 positions"):
        ref_llm.make_request([5, 6], FAST, clamps=[Clamp.of([1, None])])
    with pytest.raises(RequestError, match=r"\[0, 512\)"):
        ref_llm.make_request([5, 6], FAST, clamps=[Clamp.of([600] + [None] * 15)])


# --------------------------------------------------------------------------------------- infill and edit
@pytest.fixture(scope="module")
def llm():
    return LLM(None, max_num_seqs=8, max_model_len=1024)


def same_infill(a, b) -> bool:
    """Equal results; the entropies only approximately (a batch of another size may round differently: the
    engine promises the same tokens in any batch, not the same float bits)."""
    approx = [pytest.approx(c.entropy, rel=1e-4) for c in b.candidates]
    return (replace(a, candidates=[]) == replace(b, candidates=[])
            and [replace(c, entropy=0) for c in a.candidates] == [replace(c, entropy=0) for c in b.candidates]
            and [c.entropy for c in a.candidates] == approx)


def pinned_tokens_hold(out, plan_row) -> bool:
    tokens = torch.tensor(out.token_ids)
    mask = plan_row.clamp.mask
    return len(out.token_ids) == len(mask) and torch.equal(tokens[mask], plan_row.clamp.tokens[mask])


@pytest.mark.parametrize("strategy", ["search", "slack"])
def test_infill_pins_the_suffix_alone_and_batched(llm, strategy):
    codec = llm.infill_codec()
    plan = plan_infill(codec, PREFIX, SUFFIX, 12, strategy)
    assert len(plan.rows) == (len(search_lengths(12)) if strategy == "search" else 1)
    plain = [llm.tokenize(p) for p in ("import os\n", "class A:\n    pass\n")]
    solo_plain = [llm.generate(p, SamplingParams(seed=9, max_denoising_steps=3))[0].token_ids for p in plain]
    rows = llm.clamped_rows(plan.rows, FAST)
    others = [llm.make_request(p, SamplingParams(seed=9, max_denoising_steps=3)) for p in plain]
    outputs = llm.run([others[0], *rows, others[1]])
    for row, out in zip(plan.rows, outputs[1:-1]):
        assert pinned_tokens_hold(out, row)
        suffix_ids = codec.tokenizer.encode(SUFFIX)
        m = row.runs[0][1]
        assert out.token_ids[m:m + len(suffix_ids)] == suffix_ids[:len(out.token_ids) - m]
    assert [outputs[0].token_ids, outputs[-1].token_ids] == solo_plain
    batched = finish_infill(codec, plan, outputs[1:-1])
    alone = llm.infill(PREFIX, SUFFIX, 12, FAST, strategy=strategy)
    assert same_infill(alone, batched)
    assert alone.text == PREFIX + alone.middle + SUFFIX
    assert alone.length in [c.length for c in alone.candidates] and alone.middle_tokens <= 12
    assert alone.tokens_per_forward == pytest.approx(alone.middle_tokens / alone.decoder_passes)


def test_infill_batch_and_long_suffix(llm):
    long_suffix = "\n" + "    x = compute(x, y, z)\n" * 40
    results = llm.infill_batch([PREFIX, "import sys\n"], [SUFFIX, long_suffix], 8, FAST)
    assert same_infill(results[0], llm.infill(PREFIX, SUFFIX, 8, FAST))
    long = results[1]
    assert long.suffix_tokens_seen == 64 - long.length  # the suffix fills the rest of the canvas, then is cut
    assert long.text == "import sys\n" + long.middle + long_suffix


def test_infill_prompt_strategy(llm):
    out = llm.infill(PREFIX, SUFFIX, 8, FAST, strategy="prompt")
    assert out.strategy == "prompt" and out.text == PREFIX + out.middle + SUFFIX and out.steps >= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"max_middle_tokens": 0}, "max_middle_tokens"),
    ({"max_middle_tokens": 65}, "max_middle_tokens"),
    ({"strategy": "guess"}, "unknown infill strategy"),
    ({"lengths": [0, 4]}, "search lengths"),
    ({"strategy": "slack", "lengths": [4]}, "takes none"),
    ({"params": SamplingParams(structured_outputs={"regex": "a+"})}, "structured output does not apply to infill"),
])
def test_infill_errors(llm, kwargs, message):
    with pytest.raises(RequestError, match=message):
        llm.infill(PREFIX, SUFFIX, **{"params": FAST, **kwargs})


def test_the_batch_calls_refuse_one_string_for_a_list(llm):
    """list("ab") made two one-letter prefixes: infill_batch("ab", "cd") ran two infills, silently."""
    with pytest.raises(RequestError, match="infill_batch takes lists"):
        llm.infill_batch(PREFIX, SUFFIX, params=FAST)
    with pytest.raises(RequestError, match="edit_batch takes a list of texts"):
        llm.edit_batch(TEXT, [[(0, 1)]] * len(TEXT), params=FAST)


def test_edit_keeps_everything_outside_the_span(llm):
    start, end = TEXT.index("a + b"), TEXT.index("a + b") + 5
    codec = llm.infill_codec()
    plan = plan_edit(codec, TEXT, [(start, end)])
    out = llm.run(llm.clamped_rows([plan.row], FAST))[0]
    assert pinned_tokens_hold(out, plan.row)
    result = llm.edit(TEXT, [(start, end)], params=FAST)
    (r,) = result.replacements
    assert r.start <= start and r.end >= end and r.old == TEXT[r.start:r.end]
    assert result.text == TEXT[:r.start] + r.new + TEXT[r.end:]
    # with an instruction (in the context) and beside other edits in one batch
    batch = llm.edit_batch([TEXT, TEXT], [[(start, end)], [(0, 3), (start, end)]], ["# use multiplication", None],
                           FAST)
    assert batch[1] == llm.edit(TEXT, [(0, 3), (start, end)], params=FAST)
    assert batch[0] == llm.edit(TEXT, [(start, end)], "# use multiplication", FAST)
    two = batch[1]
    assert len(two.replacements) == 2 and two.text.endswith(TEXT[two.replacements[1].end:])


def test_an_edit_whose_row_failed_raises_instead_of_deleting_its_span(llm, monkeypatch):
    """One text of an edit_batch fails in an engine step: the call raises that error; it never returns the
    text with the span spliced out."""
    start, end = TEXT.index("a + b"), TEXT.index("a + b") + 5
    bad = plan_edit(llm.infill_codec(), TEXT, [(0, 3)]).row.prompt_ids
    advance = llm.runner._advance

    def faulty(row, outcome, i):
        if row.request.prompt_token_ids == bad:
            raise RuntimeError("engine fault in this row")
        return advance(row, outcome, i)

    monkeypatch.setattr(llm.runner, "_advance", faulty)
    with pytest.raises(RuntimeError, match="engine fault in this row"):
        llm.edit_batch([TEXT, TEXT], [[(start, end)], [(0, 3)]], params=FAST)
    monkeypatch.undo()
    assert not llm.scheduler.has_work()


def test_edit_long_text_and_slack(llm):
    lines = [f"    value_{i} = compute({i}, value_{i - 1})\n" for i in range(1, 60)]
    text = "def long():\n    value_0 = 0\n" + "".join(lines) + "    return value_59\n"
    start = text.index("compute(30")
    plan = plan_edit(llm.infill_codec(), text, [(start, start + 11)], slack=3)
    assert plan.context_tokens > 0 and plan.tokens_after_canvas > 0
    (run,) = plan.row.runs
    assert plan.row.clamp.free == run[1] - run[0] >= 3
    result = llm.edit(text, [(start, start + 11)], params=FAST, slack_tokens=3)
    (r,) = result.replacements
    assert result.text == text[:r.start] + r.new + text[r.end:]
    assert result.context_tokens == plan.context_tokens


@pytest.mark.parametrize("text, spans, message", [
    ("", [(0, 1)], "empty"),
    (TEXT, [], "at least one span"),
    (TEXT, [(5, 5)], r"span \[5, 5\) is empty"),
    (TEXT, [(-1, 3)], "out of range"),
    (TEXT, [(3, len(TEXT) + 1)], "out of range"),
    (TEXT, [(0, 10), (5, 12)], "overlap"),
    (TEXT, [(0, 2.5)], "pair of integers"),
    ("x = 1\n" * 200, [(0, 1), (1100, 1101)], "one canvas of 64 tokens"),
])
def test_edit_errors(llm, text, spans, message):
    with pytest.raises(RequestError, match=message):
        llm.edit(text, spans, params=FAST)



class CountingOffsets(list):
    """Token offsets that count how often they are read (an operation count instead of a timing)."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)

    def __iter__(self):
        for item in super().__iter__():
            self.reads += 1
            yield item


@pytest.mark.parametrize("n_spans", [1000, 4000, 8000])
def test_span_mapping_is_linear(llm, n_spans):
    """Issue 12: mapping N spans to tokens read every token once per span (8,000 spans over 60k characters
    took 16 s). Now it reads each token and each span a bounded number of times, whatever N is, and finds
    exactly the runs the per-span scan finds."""
    text = ("    value = compute(alpha, beta) + other_value * 3\n" * 1200)[:60_000]
    ids, offsets = llm.infill_codec().tokenizer.encode_with_offsets(text)
    step = len(text) // n_spans
    spans = [(k * step, k * step + 1 + k % 2) for k in range(n_spans)]
    counted = CountingOffsets(offsets)
    runs = span_tokens(counted, spans)
    assert 0 < len(runs) <= n_spans
    assert counted.reads <= 4 * (len(offsets) + n_spans)
    # the same runs as the quadratic scan, checked on a slice (the scan itself is what was slow)
    head = [s for s in spans if s[1] <= 2000]
    assert span_tokens(offsets, head) == _span_tokens_scan(offsets, head)


def test_span_mapping_matches_the_scan_on_random_spans(llm):
    import random

    rng = random.Random(0)
    text = "".join(rng.choice(["ab", " cd", "é", "\n    ", "字", "x"]) for _ in range(800))
    _, offsets = llm.infill_codec().tokenizer.encode_with_offsets(text)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), 2 * rng.randint(1, 20)))
        spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
        assert span_tokens(offsets, spans) == _span_tokens_scan(offsets, spans)


def test_edit_of_a_long_text_tokenizes_only_its_window(llm, monkeypatch):
    """A large text costs its context and one canvas: the plan is the one a full tokenization gives, the rest
    is only counted, and spans further apart than a canvas can cover are refused before tokenizing."""
    lines = [f"    value_{i} = compute({i}, value_{i - 1})\n" for i in range(1, 8000)]
    text = "def long():\n    value_0 = 0\n" + "".join(lines)
    start = text.index("compute(30,")
    codec = llm.infill_codec()
    windowed = plan_edit(codec, text, [(start, start + 11), (start + 40, start + 45)], slack=2)
    monkeypatch.setattr(type(codec.tokenizer), "max_chars_per_token", lambda self: None)
    full = plan_edit(codec, text, [(start, start + 11), (start + 40, start + 45)], slack=2)
    monkeypatch.undo()
    assert windowed.row.prompt_ids == full.row.prompt_ids and windowed.row.runs == full.row.runs
    assert torch.equal(windowed.row.clamp.mask, full.row.clamp.mask)
    assert torch.equal(windowed.row.clamp.tokens[windowed.row.clamp.mask], full.row.clamp.tokens[full.row.clamp.mask])
    assert windowed.char_ranges == full.char_ranges
    assert windowed.context_tokens == full.context_tokens
    assert abs(windowed.tokens_after_canvas - full.tokens_after_canvas) <= 1  # counted apart past the window
    calls = []
    monkeypatch.setattr(type(codec.tokenizer), "encode_with_offsets", lambda self, t: calls.append(t) or ([], []))
    with pytest.raises(RequestError, match="more than one canvas of 64 tokens can hold"):
        plan_edit(codec, text, [(0, 1), (len(text) - 1, len(text))])
    assert calls == []  # refused without tokenizing

# ---------------------------------------------------------------------------------------------- the server
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from .live_server import KEY, MODEL, LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    from letterpress.server.app import ServerConfig

    live = LiveServer(LLM(None, max_num_seqs=16, max_model_len=1024),
                      ServerConfig(served_model_names=[MODEL], api_key=KEY, max_denoising_steps=3))
    yield live
    live.stop()


def test_suffix_through_the_openai_client(client, llm):
    expected = llm.infill(PREFIX, SUFFIX, 10, SamplingParams(seed=0, max_denoising_steps=3))
    out = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, seed=0)
    assert out.choices[0].text == expected.middle and out.choices[0].finish_reason == "stop"
    stats = out.model_dump()["usage"]["letterpress"]
    assert stats["denoising_steps"] == expected.decoder_passes
    assert out.usage.completion_tokens == expected.middle_tokens
    chunks = list(client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, seed=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.middle
    slack = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, seed=0, n=2,
                                      extra_body={"infill_strategy": "slack"})
    assert slack.choices[0].text == llm.infill(PREFIX, SUFFIX, 10, SamplingParams(seed=0, max_denoising_steps=3),
                                               strategy="slack").middle
    assert len(slack.choices) == 2


def test_suffix_rows_beside_plain_rows(client):
    solo = client.completions.create(model=MODEL, prompt="import os", max_tokens=20, seed=5).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        plain = pool.submit(client.completions.create, model=MODEL, prompt="import os", max_tokens=20, seed=5)
        infills = [pool.submit(client.completions.create, model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=8,
                               seed=s) for s in range(3)]
        assert plain.result().choices[0].text == solo
        assert all(f.result().choices[0].finish_reason == "stop" for f in infills)


def test_edits_endpoint(http, llm):
    start = TEXT.index("a + b")
    r = http.post("/v1/edits", json={"model": MODEL, "input": TEXT, "spans": [[start, start + 5]], "seed": 1,
                                     "instruction": "# multiply"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = llm.edit(TEXT, [(start, start + 5)], "# multiply", SamplingParams(seed=1, max_denoising_steps=3))
    assert body["object"] == "edit" and body["choices"][0]["text"] == expected.text
    (rep,) = body["choices"][0]["replacements"]
    assert body["choices"][0]["text"] == TEXT[:rep["start"]] + rep["new"] + TEXT[rep["end"]:]
    assert body["usage"]["letterpress"]["denoising_steps"] == expected.steps


@pytest.mark.parametrize("body, message", [
    ({"input": TEXT, "spans": [[0, 999]]}, "out of range"),
    ({"input": TEXT, "spans": [[0, 10], [5, 12]]}, "overlap"),
    ({"input": "", "spans": [[0, 1]]}, "empty"),
    ({"input": TEXT, "spans": [[3, 3]]}, "is empty"),
    ({"input": TEXT, "spans": [[1, 2, 3]]}, "pair of integers"),
    ({"input": TEXT, "spans": [[0, 1]], "stream": True}, "stream"),
])
def test_edit_errors_are_400(http, body, message):
    r = http.post("/v1/edits", json={"model": MODEL, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("body, message", [
    ({"prompt": [5, 6], "suffix": "x"}, "prompt must be text"),
    ({"prompt": PREFIX, "suffix": "x", "max_tokens": 65}, "at most 64"),
    ({"prompt": PREFIX, "suffix": "x", "ignore_eos": True}, "ignore_eos"),
    ({"prompt": PREFIX, "suffix": "x", "infill_strategy": "guess"}, "infill_strategy"),
])
def test_suffix_errors_are_400(http, body, message):
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_infill_as_a_user_runs_it(tmp_path):
    source = tmp_path / "f.py"
    source.write_text("def add(a, b):\n    # fill\n    return total\n")
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", "infill", str(source), "--line", "2", "--seed", "0",
                          "--max-denoising-steps", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("def add(a, b):\n") and run.stdout.endswith("\n    return total\n")
    assert "# fill" not in run.stdout and "tokens/forward" in run.stderr


def test_cli_edit_in_place_and_errors(tmp_path, capsys):
    from letterpress.cli import main

    source = tmp_path / "f.py"
    source.write_text("def add(a, b):\n    # fill\n    return total\n")
    assert main(["infill", str(source), "--line", "3"]) == 2
    assert "line 3 is not a gap" in capsys.readouterr().err
    assert main(["edit", str(source), "--span", "7:4"]) == 2
    assert "ends before it starts" in capsys.readouterr().err
    assert main(["edit", str(source), "--span", "4:7", "--seed", "0", "--max-denoising-steps", "2", "--in-place"]) == 0
    assert "1 span(s)" in capsys.readouterr().err
    assert source.read_text().endswith("(a, b):\n    # fill\n    return total\n")


def test_in_place_keeps_crlf_and_mode_and_a_failed_write_leaves_the_file_whole(tmp_path, monkeypatch):
    """--in-place writes a temporary file beside the source and renames it: CRLF line endings and the file's mode
    survive, and a write that fails (a full disk, a size limit) leaves the old file as it was, not truncated."""
    import io
    import os

    from letterpress.cli.infill import read, write_in_place
    from letterpress.errors import RequestError

    source = tmp_path / "f.py"
    source.write_bytes(b"def f(x):\r\n    ...\r\n    return x\r\n")
    os.chmod(source, 0o640)
    write_in_place(read(str(source)), "def f(x):\n    y = x\n    return y\n")
    assert source.read_bytes() == b"def f(x):\r\n    y = x\r\n    return y\r\n"
    assert source.stat().st_mode & 0o777 == 0o640

    class FullDisk:  # the real file, whose write stops after 10 characters, as on a full disk
        def __init__(self, *args, **kw):
            self.file = io.open(*args, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:10])
            self.file.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("letterpress.cli.infill.open",
                        lambda file, mode="r", **kw: io.open(file, mode, **kw) if "r" in mode
                        else FullDisk(file, mode, **kw), raising=False)
    with pytest.raises(RequestError, match="cannot write .*No space left on device; the file is unchanged"):
        write_in_place(read(str(source)), "x" * 1000)
    monkeypatch.undo()
    assert source.read_bytes() == b"def f(x):\r\n    y = x\r\n    return y\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.py"]  # no temporary file left behind


def test_a_file_is_read_and_written_back_as_an_editor_has_it(tmp_path):
    """A byte-order mark is set aside (line 1 may be a gap; --span offsets are an editor's) and written back;
    CR-only files keep CR; standard output keeps CRLF (an editor piping it back keeps the file's ends); a form
    feed does not shift line numbers (str.splitlines split at it)."""
    from letterpress.cli.infill import read, write_in_place
    from letterpress.infill import LineGap

    bom = tmp_path / "bom.py"
    bom.write_bytes(b"\xef\xbb\xbf...\nx = 1\n")
    source = read(str(bom))
    assert source.text == "...\nx = 1\n" and source.bom
    gap = LineGap.marked(source.text, 1)
    write_in_place(source, gap.fill("\ny = 2"))  # the model's leading newline: nothing above it to end
    assert bom.read_bytes() == b"\xef\xbb\xbfy = 2\nx = 1\n"
    cr = tmp_path / "cr.py"
    cr.write_bytes(b"x = 1\r...\ry = 2\r")
    source = read(str(cr))
    write_in_place(source, LineGap.marked(source.text, 2).fill("\nz = 3"))
    assert cr.read_bytes() == b"x = 1\rz = 3\ry = 2\r"
    assert read(str(cr)).encoded("a\nb\n", bom=False) == b"a\rb\r"
    assert LineGap.marked("import os\n\x0c\ndef f():\n    ...\n    return 1\n", 4).prefix.endswith("def f():")


def test_in_place_refuses_what_it_cannot_replace_whole(tmp_path):
    """Before the model loads: a read-only file, a read-only folder (a traceback after the model ran, before),
    a file with another hard link, mixed line ends."""
    import os

    from letterpress.cli.infill import check_in_place
    from letterpress.errors import RequestError

    mixed = tmp_path / "mixed.py"
    mixed.write_bytes(b"x = 1\r\n...\nz = 3\n")
    with pytest.raises(RequestError, match="mixes line ends"):
        check_in_place(str(mixed))
    linked = tmp_path / "a.py"
    linked.write_text("...\n")
    os.link(linked, tmp_path / "b.py")
    with pytest.raises(RequestError, match="has 2 hard links"):
        check_in_place(str(linked))
    if os.geteuid() != 0:  # root may write anything, and os.access says so
        locked = tmp_path / "locked.py"
        locked.write_text("...\n")
        os.chmod(locked, 0o444)
        with pytest.raises(RequestError, match="is read-only"):
            check_in_place(str(locked))


def test_a_failed_candidate_row_is_never_chosen(llm, monkeypatch):
    """A candidate row that failed in the engine (no finished canvas) drops out of the search; when every
    candidate failed, the engine's error is raised rather than an IndexError."""
    real_run = LLM.run

    def fail_rows(which):
        def run(self, requests):
            outputs = real_run(self, requests)
            for i in which(len(outputs)):
                outputs[i] = replace(outputs[i], finish_reason="error", final_entropy=[],
                                     error=RuntimeError(f"row {i} broke"))
            return outputs
        return run

    params = SamplingParams(seed=3, max_denoising_steps=3)
    whole = llm.infill(PREFIX, SUFFIX, 12, params)
    monkeypatch.setattr(LLM, "run", fail_rows(lambda n: [0]))
    survivor = llm.infill(PREFIX, SUFFIX, 12, params)
    assert len(survivor.candidates) == len(whole.candidates)
    assert survivor.length != survivor.candidates[0].length  # row 0 failed: another length won
    assert survivor.candidates[0].entropy == float("inf")
    monkeypatch.setattr(LLM, "run", fail_rows(range))
    with pytest.raises(RuntimeError, match="row 0 broke"):
        llm.infill(PREFIX, SUFFIX, 12, params)


def test_a_gap_deep_in_a_long_file_is_filled_from_the_text_just_above_it(llm):
    """The whole prefix went into the context: a gap more than max_model_len tokens into a file was a "prompt
    exceeds max_model_len" error. The context now keeps what fits beside the canvas, from a line start."""
    from letterpress.infill import plan_edit, plan_infill

    codec = llm.infill_codec()
    room = llm.max_model_len - codec.canvas_length
    prefix = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400)) + "def g(x):\n"
    plan = plan_infill(codec, prefix, "    return x\n", 8)
    context = plan.rows[0].prompt_ids
    assert len(context) <= room and len(codec.tokenizer.encode(prefix)) > room
    kept = codec.tokenizer.decode(context)
    assert prefix.endswith(kept) and prefix[len(prefix) - len(kept) - 1] == "\n"  # from a line start
    assert llm.infill(prefix, "    return x\n", 8, params=FAST).text.startswith(prefix)
    # a prefix and a suffix far longer than a context: only what can fit is tokenized (11 MB took 17 s)
    calls = []
    encode, encode_with_offsets = codec.tokenizer.encode, codec.tokenizer.encode_with_offsets
    codec.tokenizer.encode = lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k)
    codec.tokenizer.encode_with_offsets = lambda text: calls.append(len(text)) or encode_with_offsets(text)
    try:
        huge = plan_infill(codec, prefix * 50, "    return x\n" * 20000, 8)
    finally:
        del codec.tokenizer.encode, codec.tokenizer.encode_with_offsets
    assert huge.rows[0].prompt_ids[-len(context) + 1:] == context[1:] and max(calls) < 50_000
    long_text = prefix * 50 + "    return x + 1\n"
    calls.clear()
    codec.tokenizer.encode_with_offsets = lambda text: calls.append(len(text)) or encode_with_offsets(text)
    try:
        far = plan_edit(codec, long_text, [(len(long_text) - 6, len(long_text) - 1)])
    finally:
        del codec.tokenizer.encode_with_offsets
    assert max(calls) < 50_000 and far.char_ranges[0][1] == len(long_text) - 1
    text = prefix + "    return x + 1\n"
    edit = plan_edit(codec, text, [(len(text) - 6, len(text) - 1)])
    assert far.row.prompt_ids[-30:] == edit.row.prompt_ids[-30:]
    assert torch.equal(far.row.clamp.tokens, edit.row.clamp.tokens) and torch.equal(far.row.clamp.mask, edit.row.clamp.mask)
    assert len(edit.row.prompt_ids) <= room
    assert llm.edit(text, [(len(text) - 6, len(text) - 1)], params=FAST).text.startswith(prefix)
