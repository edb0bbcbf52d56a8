"""`"rule_mask": "sudoku"` on /v1/completions: the rule-mask search served by a real uvicorn server on loopback,
with the shipped Sudoku model (letterpress/assets/sudoku), through a real HTTP client."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from letterpress import LLM
from letterpress.apps.sudoku import is_solution, prompt_text, trained_givens
from letterpress.apps.sudoku_solve import RuledDiffusionSearch, sudoku_token_ids
from letterpress.embedded import ASSETS
from letterpress.server.app import ServerConfig
from tests.live_server import DEADLINE_S, LiveServer

MODEL = "sudoku"
# The first held-out puzzle with 30 givens (recipes_builtin.bucket_puzzles(30, 1)): the plain sampler does not
# solve it; the search does, in a few passes
PUZZLE = "371000050500000907000570010080004005060380700040700280000000526200410009000209000"
SOLUTION = "371692458526148937894573612783924165162385794945761283419837526258416379637259841"


@pytest.fixture(scope="module")
def live():
    llm = LLM(ASSETS / "sudoku", max_num_seqs=4, max_model_len=256)
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL]))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def served(live):
    return live.url, live.server_state.llm


def expected_forwards(llm: LLM, puzzle: str, seed: int) -> int:
    """The library's search on the same weights (apps/sudoku_solve.py): the passes the server must match."""
    prompt, digits = sudoku_token_ids(llm.tokenizer, llm.model.config.canvas_length, puzzle)
    search = RuledDiffusionSearch(llm.model, prompt, digits, puzzle, llm.defaults.entropy_bound, seed)
    while not search.done:
        search.forward()
    assert search.search.solved
    return search.forwards


def solve(url: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt_text(PUZZLE), "rule_mask": "sudoku", **fields}
    return httpx.post(url + "/v1/completions", json=body, timeout=DEADLINE_S)


def test_solves_a_puzzle_the_plain_sampler_does_not(served):
    url, llm = served
    plain = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt_text(PUZZLE),
                                                       "temperature": 0, "max_tokens": 81}, timeout=DEADLINE_S)
    assert plain.status_code == 200 and not is_solution(plain.json()["choices"][0]["text"], PUZZLE)

    r = solve(url, seed=3)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert choice["text"] == SOLUTION and choice["finish_reason"] == "stop"
    stats = data["usage"]["letterpress"]
    search = stats["rule_mask"]
    assert search["name"] == "sudoku" and search["solved"] is True and search["max_forwards"] == 81
    assert search["forwards"] == stats["denoising_steps"] == expected_forwards(llm, PUZZLE, seed=3)
    assert stats["tokens_per_forward"] == pytest.approx(82 / search["forwards"])  # 81 cells + EOS, as plain
    assert search["cells_per_forward"] == pytest.approx(PUZZLE.count("0") / search["forwards"])
    assert data["usage"]["prompt_tokens"] == 82 and data["usage"]["completion_tokens"] == 81
    # a grid works as the prompt too, and the same seed gives the same search
    again = solve(url, seed=3, prompt=PUZZLE.replace("0", ".")).json()
    assert again["choices"][0]["text"] == SOLUTION
    assert again["usage"]["letterpress"]["rule_mask"] == search


def test_streams_the_board_as_it_fills_in(served):
    url, _ = served
    body = {"model": MODEL, "prompt": prompt_text(PUZZLE), "rule_mask": "sudoku", "stream": True, "seed": 3,
            "stream_options": {"include_usage": True, "denoising_preview": True}}
    previews, text, usage, done = [], "", None, False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line == "data: [DONE]":
                done = True
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "denoising_preview":
                    previews.append(data["denoising_preview"])
                else:
                    text += "".join(c["text"] for c in data["choices"])
                    usage = data.get("usage") or usage
                event = None
    assert done and text == SOLUTION
    assert len(previews) == usage["letterpress"]["rule_mask"]["forwards"]
    assert [p["step"] for p in previews] == list(range(1, len(previews) + 1))
    for p in previews:  # the board: the givens and the cells accepted so far, "0" elsewhere; never a clash
        board = p["text"]
        assert len(board) == len(p["tokens"]) == len(p["accepted_mask"]) == 81
        assert all(g == "0" or g == b for g, b in zip(PUZZLE, board))
        assert all(b == "0" or b == s for b, s in zip(board, SOLUTION)) or usage["letterpress"]["rule_mask"]["backtracks"]
        assert sum(p["accepted_mask"]) == p["accepted"]
        assert all(board[i] != "0" for i in range(81) if p["accepted_mask"][i])
    assert previews[-1]["text"] == SOLUTION


def test_runs_beside_other_requests(served):
    """Searches and plain completions at once: each gets its own answer (the engine thread interleaves them)."""
    url, _ = served
    plain = {"model": MODEL, "prompt": prompt_text(PUZZLE), "temperature": 0, "max_tokens": 81}
    with ThreadPoolExecutor(4) as pool:
        searches = [pool.submit(solve, url, seed=3) for _ in range(2)]
        plains = [pool.submit(httpx.post, url + "/v1/completions", json=plain, timeout=DEADLINE_S) for _ in range(2)]
        results = [f.result() for f in searches + plains]
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["choices"][0]["text"] for r in results[:2]] == [SOLUTION, SOLUTION]
    assert results[2].json()["choices"][0]["text"] == results[3].json()["choices"][0]["text"]
    assert "rule_mask" not in results[2].json()["usage"]["letterpress"]


def test_out_of_passes_is_no_solution_not_a_wrong_grid(served):
    url, _ = served
    data = solve(url, seed=3, max_denoising_steps=2).json()
    assert data["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    search = data["usage"]["letterpress"]["rule_mask"]
    assert search["solved"] is False and search["forwards"] == 2 == search["max_forwards"]


# 50 givens: within what every shipped Sudoku model was trained on (tests/test_cli.py's SOLVED_EASY)
EASY = "794003800000040359560900017009021673307695048410007090648059731901008520200174086"


def test_a_puzzle_harder_than_the_model_learned_gets_a_note(served):
    """As `letterpress sudoku` notes on stderr, the answer notes in `usage.letterpress.harder_than_trained` a
    puzzle with fewer givens than the model's `sudoku_trained_givens`: with the rule mask and without it."""
    url, _ = served
    low, high = trained_givens(ASSETS / "sudoku")
    note = {"givens": 30, "trained_givens": [low, high],
            "message": f"this puzzle has 30 givens; the model was trained on puzzles with {low}-{high}, so it is "
                       "harder than anything the model learned and it may find no valid solution"}
    plain = {"model": MODEL, "temperature": 0, "max_tokens": 81, "max_denoising_steps": 1}
    for prompt in (prompt_text(PUZZLE), PUZZLE):
        hard = [solve(url, seed=3, max_denoising_steps=1, prompt=prompt),
                httpx.post(url + "/v1/completions", json={**plain, "prompt": prompt}, timeout=DEADLINE_S)]
        assert [r.json()["usage"]["letterpress"]["harder_than_trained"] for r in hard] == [note, note]
    easy = [solve(url, max_denoising_steps=1, prompt=prompt_text(EASY)),
            httpx.post(url + "/v1/completions", json={**plain, "prompt": prompt_text(EASY)}, timeout=DEADLINE_S),
            httpx.post(url + "/v1/completions", json={**plain, "prompt": "not a puzzle"}, timeout=DEADLINE_S)]
    assert all(r.status_code == 200 and "harder_than_trained" not in r.json()["usage"]["letterpress"] for r in easy)


@pytest.mark.parametrize("fields, param, words", [
    ({"prompt": PUZZLE[:80]}, "prompt", "81 cells"),
    ({"prompt": "55" + PUZZLE[2:]}, "prompt", "appears twice in row 1"),
    ({"prompt": prompt_text(PUZZLE).replace("ab7", "ba7")}, "prompt", "cell word 2"),
    ({"prompt": PUZZLE[:40] + "x" + PUZZLE[41:]}, "prompt", "unexpected character"),
    ({"prompt": [1, 2, 3]}, "prompt", "string prompt"),
    ({"temperature": 0.7}, "temperature", "greedily"),
    ({"top_k": 5}, "top_k", "does not sample"),
    ({"n": 2}, "n", "cannot be combined"),
    ({"suffix": "x"}, "suffix", "cannot be combined"),
    ({"stop": ["1"]}, "stop", "cannot be combined"),  # it cut the answer to "7945"
    ({"stop_token_ids": [5]}, "stop_token_ids", "cannot be combined"),
    ({"max_tokens": 10}, "max_tokens", "81 cells"),
    ({"rule_mask": "chess"}, "rule_mask", None),
])
def test_bad_requests_get_an_openai_error(served, fields, param, words):
    url, _ = served
    r = solve(url, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words is None or words in error["message"]


def test_a_failing_search_fails_only_its_own_request(served, monkeypatch):
    """A search that raises (here: made to, for one puzzle) gets its own 500; a search beside it still solves."""
    url, _ = served
    poisoned = "0" + PUZZLE[1:]  # the puzzle less its first given: its first search pass raises
    real_forward = RuledDiffusionSearch.forward

    def forward(self):
        if self.search.puzzle == poisoned:
            raise RuntimeError("injected")
        return real_forward(self)

    monkeypatch.setattr(RuledDiffusionSearch, "forward", forward)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(solve, url, prompt=poisoned)
        good = pool.submit(solve, url, seed=3)
        bad, good = bad.result(), good.result()
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert "injected" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == SOLUTION
    assert httpx.get(url + "/health").status_code == 200


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_the_search_passes_count_in_metrics(served):
    """A search's decoder passes and tokens count in /metrics as a plain completion's do: one step per pass."""
    url, _ = served
    counters = ("letterpress_decoder_steps_total", "letterpress_generation_tokens_total",
                "letterpress_tokens_per_forward_count")

    def deltas(request) -> tuple[dict, list[float]]:
        before = [metric(url, name) for name in counters]
        data = request().json()
        return data, [metric(url, name) - b for name, b in zip(counters, before)]

    plain, counted = deltas(lambda: httpx.post(url + "/v1/completions", timeout=DEADLINE_S, json={
        "model": MODEL, "prompt": prompt_text(PUZZLE), "temperature": 0, "max_tokens": 81}))
    assert counted == [plain["usage"]["letterpress"]["denoising_steps"], plain["usage"]["completion_tokens"], 1]
    solved, counted = deltas(lambda: solve(url, seed=3))
    assert counted == [solved["usage"]["letterpress"]["rule_mask"]["forwards"], 81, 1]
    unsolved, counted = deltas(lambda: solve(url, seed=3, max_denoising_steps=2))
    assert unsolved["choices"][0]["text"] == "" and counted == [2, 0, 1]


def test_a_search_is_a_running_row_and_a_failed_one_counts_its_steps(served, monkeypatch):
    """While a search runs, /metrics counts it in letterpress_running_rows (it holds a slot as a plain row does);
    a search that ends without a solution still records its passes in the steps-per-canvas histogram."""
    url, _ = served
    third_pass = threading.Event()
    real_forward = RuledDiffusionSearch.forward

    def forward(self):  # the third (and last) pass waits for the test: the search is surely in flight meanwhile
        if self.forwards == 2:
            third_pass.wait(DEADLINE_S)
        return real_forward(self)

    monkeypatch.setattr(RuledDiffusionSearch, "forward", forward)
    names = ("letterpress_steps_per_canvas_count", "letterpress_steps_per_canvas_sum")
    before = [metric(url, name) for name in names]
    body = {"model": MODEL, "prompt": PUZZLE, "rule_mask": "sudoku", "seed": 3, "max_denoising_steps": 3,
            "stream": True, "stream_options": {"denoising_preview": True}}
    running, previews = None, 0
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as response:
            for line in response.iter_lines():
                previews += line.startswith("event: denoising_preview")
                if previews == 2 and running is None and line.startswith("data:"):
                    running = metric(url, "letterpress_running_rows")  # the metrics of the first pass's step
                    third_pass.set()
    finally:
        third_pass.set()
    assert running == 1 and previews == 3
    assert metric(url, "letterpress_running_rows") == 0
    # unsolved in 3 passes (10 solve it): one canvas of 3 steps, as a plain canvas that ran out of steps
    assert [metric(url, name) - b for name, b in zip(names, before)] == [1, 3]


def test_a_step_with_both_kinds_of_rows_updates_the_metrics_once(live, monkeypatch):
    """A step that runs scheduler rows and a search's pass updates the metrics once, after both: then the
    running rows are the plain row and the search, and the decoder steps count the passes of both."""
    engine, llm = live.server_state.engine, live.server_state.llm
    metrics = engine.metrics
    steps: list[dict] = []
    real_step, real_after_step, real_forward = engine._step, metrics.after_step, RuledDiffusionSearch.forward

    def step():
        steps.append({"kinds": (engine.scheduler.has_work(), bool(engine._tasks)), "updates": 0})
        real_step()

    def after_step(*args, **kwargs):  # what a client would read from /metrics next (before the answers go out)
        real_after_step(*args, **kwargs)
        steps[-1]["updates"] += 1
        steps[-1].update(running=metrics.running_rows, decoder_steps=metrics.decoder_steps,
                         passes=llm.runner.decoder_passes - engine._passes_at_start + engine._task_passes)

    def forward(self):  # the search's second pass waits until the plain request has reached the engine
        deadline = time.monotonic() + DEADLINE_S
        # in its inbox, or already drained into the scheduler by this step (waiting on the inbox alone then ran
        # to the deadline, and the clients timed out: a race seen in the full suite)
        while (self.forwards == 1 and engine._inbox.empty() and not engine.scheduler.has_work()
               and time.monotonic() < deadline):
            time.sleep(0.01)
        return real_forward(self)

    monkeypatch.setattr(engine, "_step", step)
    monkeypatch.setattr(metrics, "after_step", after_step)
    monkeypatch.setattr(RuledDiffusionSearch, "forward", forward)
    plain = {"model": MODEL, "prompt": prompt_text(PUZZLE), "temperature": 0, "max_tokens": 81}
    with ThreadPoolExecutor(2) as pool:
        search = pool.submit(solve, live.url, seed=3)
        deadline = time.monotonic() + DEADLINE_S
        while not steps and time.monotonic() < deadline:  # the search's first step has begun
            time.sleep(0.01)
        other = pool.submit(httpx.post, live.url + "/v1/completions", json=plain, timeout=DEADLINE_S)
        search, other = search.result(), other.result()
    assert search.json()["choices"][0]["text"] == SOLUTION and other.status_code == 200
    both = [s for s in steps if s["kinds"] == (True, True)]
    assert both and all(s["updates"] == 1 for s in steps)
    assert both[0]["running"] == 2 and all(s["decoder_steps"] == s["passes"] for s in steps)


def aborted_rows(url: str) -> int:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('letterpress_finished_rows_total{reason="abort"}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_client_that_leaves_stops_its_search(served, monkeypatch):
    url, _ = served
    real_forward = RuledDiffusionSearch.forward

    def slow_forward(self):  # 81 passes take seconds: the client is gone long before the search could end
        time.sleep(0.05)
        return real_forward(self)

    monkeypatch.setattr(RuledDiffusionSearch, "forward", slow_forward)
    before = aborted_rows(url)
    body = {"model": MODEL, "prompt": "0" * 81, "rule_mask": "sudoku", "stream": True,
            "stream_options": {"denoising_preview": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the first pass's board: then hang up
    deadline = time.monotonic() + DEADLINE_S
    while aborted_rows(url) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted_rows(url) == before + 1
    assert solve(url, seed=3).json()["choices"][0]["text"] == SOLUTION  # and the server goes on
