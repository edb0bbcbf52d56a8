"""The playground page at `/`: served from the package by the server `letterpress serve` runs (uvicorn on loopback,
the shipped default model), driven in a real headless Chromium (the system's `chromium` and `chromedriver`,
through selenium)."""

from __future__ import annotations

import json

import httpx
import pytest

from letterpress import LLM
from letterpress.apps.sudoku import trained_givens
from letterpress.embedded import ASSETS
from letterpress.server.app import ServerConfig
from tests.browser import NO_BROWSER, browser_paths, headless_chrome
from tests.live_server import DEADLINE_S, KEY, MODEL, LiveServer


@pytest.fixture(scope="module")
def served():
    """The app `letterpress serve` runs (build_app), with the shipped default model, on a loopback port."""
    llm = LLM(None, max_model_len=1024)
    llm.defaults.max_denoising_steps = 8  # enough frames to watch, few enough to keep the file fast
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL]))
    yield live.url
    live.stop()


def test_page_and_assets_are_served_from_the_package(served):
    page = httpx.get(served + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/playground/playground.js" in page.text and "/playground/playground.css" in page.text
    assert "://" not in page.text  # no CDN: everything comes from this server
    script = httpx.get(served + "/playground/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "denoising_preview" in script.text
    assert httpx.get(served + "/playground/playground.css").headers["content-type"].startswith("text/css")
    assert httpx.get(served + "/playground/nothing.js").status_code == 404


def test_preview_events_carry_each_positions_token_and_acceptance(served):
    """What the page's canvas view draws: `tokens` and `accepted_mask` line up with `token_ids`."""
    body = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 24, "seed": 0, "stream": True,
            "stream_options": {"denoising_preview": True}}
    previews = []
    with httpx.stream("POST", served + "/v1/completions", json=body, timeout=DEADLINE_S) as response:
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "denoising_preview":
                previews.append(json.loads(line[5:])["denoising_preview"])
                event = None
    assert previews
    for p in previews:
        assert len(p["tokens"]) == len(p["accepted_mask"]) == len(p["token_ids"])
        assert "".join(p["tokens"]) == p["text"] or not p["text"].isascii()  # bytes of one character may split
        assert sum(p["accepted_mask"]) <= p["accepted"]  # the mask is cut with the draft (EOS, max_tokens)
    assert any(any(p["accepted_mask"]) for p in previews)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the chat tests below (each loads the page afresh): starting one takes a while."""
    if browser_paths() is None:
        pytest.skip(NO_BROWSER)
    driver = headless_chrome()
    yield driver
    driver.quit()


def open_page(driver, url, model=MODEL):
    """Load the page and wait for its model lookup; the network at full speed again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    network(driver)
    driver.get(url + "/")
    WebDriverWait(driver, DEADLINE_S).until(lambda d: d.find_element(By.ID, "model-name").text == model)


def network(driver, latency_ms=0, offline=False):
    """Chrome's network emulation (DevTools): a latency keeps a reply in flight for that long; offline is a
    server that does not answer."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": offline, "latency": latency_ms, "downloadThroughput": -1, "uploadThroughput": -1})


def type_message(driver, text, send=True):
    """Type into the chat box; send: press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "chat-input")
    box.send_keys(text)
    if send:
        box.send_keys(Keys.ENTER)


def wait_reply(driver, count=1):
    """The `count`-th reply, once it has ended (done, error or stopped)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    selector = ".msg.assistant:not([data-state=streaming])"
    return WebDriverWait(driver, DEADLINE_S).until(
        lambda d: len(found := d.find_elements(By.CSS_SELECTOR, selector)) >= count and found[count - 1])


def history(driver):
    return [m["role"] for m in driver.execute_script("return page.messages")]


def test_enter_during_a_reply_sends_nothing(served, browser):
    """Send is disabled while a reply streams, and Enter (which submits the form anyway) is ignored too: a second
    request would interleave two replies in the history and on the canvas."""
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    browser.find_element(By.ID, "chat-max-tokens").clear()
    browser.find_element(By.ID, "chat-max-tokens").send_keys("8")
    network(browser, latency_ms=1500)  # the reply stays in flight for a while
    type_message(browser, "Hello!")
    type_message(browser, "And again?")
    assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "And again?"  # kept, not sent
    network(browser)
    assert wait_reply(browser).get_attribute("data-state") == "done"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")) == 2
    assert history(browser) == ["user", "assistant"]


def test_stop_and_new_chat_end_the_reply_in_flight(served, browser):
    """Stop (shown while a reply runs) aborts the request and leaves the turn out of the conversation; New chat
    aborts it too, so that no late reply lands in the new conversation."""
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    stop = browser.find_element(By.ID, "chat-stop")
    assert not stop.is_displayed()
    network(browser, latency_ms=1500)
    type_message(browser, "Hello!")
    assert stop.is_displayed()
    stop.click()
    reply = wait_reply(browser)
    assert reply.get_attribute("data-state") == "stopped" and "stopped" in reply.text
    assert history(browser) == [] and not stop.is_displayed()
    assert browser.find_element(By.ID, "chat-send").is_enabled()

    type_message(browser, "Hello again!")
    browser.find_element(By.ID, "chat-reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == [] and history(browser) == []
    assert not stop.is_displayed()
    network(browser)
    type_message(browser, "A new question")
    assert wait_reply(browser).get_attribute("data-state") == "done"
    assert [m["content"] for m in browser.execute_script("return page.messages")][0] == "A new question"
    assert history(browser) == ["user", "assistant"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")) == 2
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_enter_that_ends_an_ime_composition_sends_nothing(served, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    type_message(browser, "\u3053\u3093\u306b\u3061\u306f", send=False)
    enter = """arguments[0].dispatchEvent(new KeyboardEvent("keydown",
                 {key: "Enter", bubbles: true, cancelable: true, ...arguments[1]}))"""
    box = browser.find_element(By.ID, "chat-input")
    for composing in ({"isComposing": True}, {"keyCode": 229}):
        browser.execute_script(enter, box, composing)
        assert box.get_attribute("value") == "\u3053\u3093\u306b\u3061\u306f"
        assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []
    browser.execute_script(enter, box, {})  # the same event without a composition sends
    assert box.get_attribute("value") == "" and browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    wait_reply(browser)


def test_canvas_status_counts_the_positions_it_shows(served, browser):
    """A preview's `accepted` counts the whole canvas, its draft is cut at EOS: the status line does not mix the
    two (it read "34 accepted, 32 positions")."""
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    show = """showPreview({index: 0, canvas: arguments[0], step: 15, accepted: arguments[1], text: "",
                           token_ids: [...Array(32).keys()], tokens: Array(32).fill("x"),
                           accepted_mask: Array(32).fill(true).fill(false, 30)})"""
    browser.execute_script(show, 1, 34)
    status = browser.find_element(By.ID, "canvas-status")
    assert status.text == "(canvas 1, step 15: 30 of 32 positions accepted; 34 in the whole canvas)"
    browser.execute_script(show, 2, 30)
    assert status.text == "(canvas 2, step 15: 30 of 32 positions accepted)"


@pytest.fixture(scope="module")
def keyed_served():
    """The app with `--api-key`."""
    llm = LLM(None, max_model_len=1024)
    llm.defaults.max_denoising_steps = 8
    live = LiveServer(llm, ServerConfig(served_model_names=[MODEL], api_key=KEY))
    yield live.url
    live.stop()


def test_send_says_why_without_a_key_and_when_the_key_is_refused(keyed_served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_served + "/")
    wait = WebDriverWait(browser, DEADLINE_S)
    notice, chat_notice = browser.find_element(By.ID, "server-notice"), browser.find_element(By.ID, "chat-notice")
    wait.until(lambda d: notice.text.startswith("This server needs an API key"))
    type_message(browser, "Hello!")
    wait.until(lambda d: chat_notice.text.startswith("Not sent: This server needs an API key"))
    assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "Hello!"  # kept for the next try
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong-key")
    browser.find_element(By.CSS_SELECTOR, "#key-box button").click()
    wait.until(lambda d: notice.text.startswith("The server refused this API key"))
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "chat-send").click()  # looks the model up with this key, then sends
    assert wait_reply(browser).get_attribute("data-state") == "done"
    assert not notice.is_displayed() and not chat_notice.is_displayed()
    assert browser.find_element(By.ID, "model-name").text == MODEL


def test_a_restarted_or_stopped_server_is_looked_up_again(served, browser):
    """After 404 model_not_found (a restart with another model; here the page's model name made stale) or no
    answer at all, the page looks the model up again, so that the next Send works without a reload."""
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    browser.find_element(By.ID, "chat-max-tokens").clear()
    browser.find_element(By.ID, "chat-max-tokens").send_keys("8")
    browser.execute_script("page.model = 'the-model-before'")
    type_message(browser, "Hello!")
    reply = wait_reply(browser)
    assert reply.get_attribute("data-state") == "error"
    assert reply.text.endswith(f"The server now serves \u201c{MODEL}\u201d: try again.")
    assert history(browser) == []  # the failed turn left the conversation
    type_message(browser, "Hello again!")
    assert wait_reply(browser, 2).get_attribute("data-state") == "done"
    assert history(browser) == ["user", "assistant"]

    network(browser, offline=True)
    type_message(browser, "Still there?")
    reply = wait_reply(browser, 3)
    assert reply.get_attribute("data-state") == "error"
    assert reply.text.endswith("The server did not answer (is it running?)")
    assert browser.find_element(By.ID, "server-notice").text == "The server did not answer (is it running?)"
    assert history(browser) == ["user", "assistant"]
    network(browser)
    type_message(browser, "Back?")  # the lookup again, then the request
    assert wait_reply(browser, 4).get_attribute("data-state") == "done"
    assert history(browser) == ["user", "assistant"] * 2
    assert not browser.find_element(By.ID, "server-notice").is_displayed()


@pytest.mark.skipif(browser_paths() is None, reason=NO_BROWSER)
def test_chat_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chrome()
    try:
        wait = WebDriverWait(driver, DEADLINE_S)
        driver.get(served + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == MODEL)
        tokens = driver.find_element(By.ID, "chat-max-tokens")
        tokens.clear()
        tokens.send_keys("48")
        driver.find_element(By.ID, "chat-input").send_keys("Hello! Who are you?")
        driver.find_element(By.ID, "chat-send").click()
        reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done], "
                                                                      ".msg.assistant[data-state=error]"))[0]
        screenshot = tmp_path / "playground.png"
        driver.save_screenshot(str(screenshot))
        print(f"playground screenshot: {screenshot}")
        assert reply.get_attribute("data-state") == "done", reply.text
        frames = int(driver.find_element(By.ID, "canvas-frames").get_attribute("data-count"))
        assert frames >= 2, "the preview frames never changed the canvas view"
        assert driver.find_elements(By.CSS_SELECTOR, "#canvas .tok.accepted")
        figures = driver.find_element(By.ID, "chat-figures").text
        assert "denoising steps" in figures and "tokens/forward" in figures and "tokens/s" in figures

        # the other panels answer too: an infill of the selected `...`, and the Sudoku board, whose answer from a
        # model that is not the Sudoku model is checked and refused rather than shown
        driver.execute_script("const t = arguments[0], i = t.value.indexOf('...'); t.setSelectionRange(i, i + 3);",
                              driver.find_element(By.ID, "infill-text"))
        driver.find_element(By.ID, "infill-run").click()
        wait.until(lambda d: d.find_element(By.ID, "infill-figures").text)
        assert driver.find_elements(By.CSS_SELECTOR, "#infill-result mark")
        assert driver.find_element(By.ID, "sudoku-notice").is_displayed()
        # the suite's default is the code model: no notice over the infill panel (tiny-tasks and Sudoku get one)
        assert not driver.find_element(By.ID, "infill-notice").is_displayed()
        status = driver.find_element(By.ID, "sudoku-status")
        driver.find_element(By.ID, "sudoku-solve").click()  # with the rules (the default): the server's 400
        wait.until(lambda d: "needs a Sudoku model" in status.text)
        logged = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # reading the log empties it
        assert all(e["source"] == "network" and "status of 400" in e["message"] for e in logged), logged
        driver.find_element(By.ID, "sudoku-rules").click()  # off: the plain sampler
        driver.find_element(By.ID, "sudoku-solve").click()
        wait.until(lambda d: d.find_element(By.ID, "sudoku-figures").text)
        assert status.text.startswith("No valid solution found")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_rule_mask_needs_a_sudoku_model(served):
    grid = "371000050500000907000570010080004005060380700040700280000000526200410009000209000"
    r = httpx.post(served + "/v1/completions", json={"model": MODEL, "prompt": grid, "rule_mask": "sudoku"},
                   timeout=DEADLINE_S)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "rule_mask" and error["code"] == "unsupported"
    assert "needs a Sudoku model" in error["message"]


@pytest.fixture(scope="module")
def sudoku_served():
    """The same app serving the shipped Sudoku model."""
    live = LiveServer(LLM(ASSETS / "sudoku", max_model_len=256), ServerConfig(served_model_names=["sudoku"]))
    yield live.url
    live.stop()


@pytest.mark.skipif(browser_paths() is None, reason=NO_BROWSER)
def test_sudoku_board_solves_with_the_rules(sudoku_served):
    """A puzzle with 30 givens (the first of recipes_builtin.bucket_puzzles(30)): beyond the plain sampler, solved
    with "use the Sudoku rules" (on by default), the board filling in pass by pass."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    puzzle = "371000050500000907000570010080004005060380700040700280000000526200410009000209000"
    solution = "371692458526148937894573612783924165162385794945761283419837526258416379637259841"
    driver = headless_chrome()
    try:
        wait = WebDriverWait(driver, DEADLINE_S)
        driver.get(sudoku_served + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "sudoku")
        assert not driver.find_element(By.ID, "sudoku-notice").is_displayed()
        assert "not text" in driver.find_element(By.ID, "infill-notice").text
        assert driver.find_element(By.ID, "sudoku-rules").is_selected()
        driver.execute_script("""
            setBoard(arguments[0]);
            window.statusLog = [];
            new MutationObserver(() => window.statusLog.push(document.getElementById("sudoku-status").textContent))
              .observe(document.getElementById("sudoku-status"), {childList: true, characterData: true, subtree: true});
        """, puzzle)
        driver.find_element(By.ID, "sudoku-solve").click()
        wait.until(lambda d: d.find_element(By.ID, "sudoku-figures").text)
        assert driver.find_element(By.ID, "sudoku-status").text == "Solved (30 givens)."
        board = "".join(c.get_attribute("value") for c in driver.find_elements(By.CSS_SELECTOR, "#sudoku-board input"))
        assert board == solution
        passes = [t for t in driver.execute_script("return window.statusLog") if t.startswith("Pass ")]
        assert len(passes) >= 2 and passes[0].startswith("Pass 1:"), passes
        figures = driver.find_element(By.ID, "sudoku-figures").text
        assert "denoising steps" in figures and "rule mask" in figures and "tokens/forward" in figures
        assert "tokens/s" in figures
        # the server's note (usage.letterpress.harder_than_trained) under the board: 30 givens are fewer than
        # the shipped model was trained on
        low, high = trained_givens(ASSETS / "sudoku")
        note = driver.find_element(By.ID, "sudoku-note")
        assert note.is_displayed() and note.text == (
            f"Note: This puzzle has 30 givens; the model was trained on puzzles with {low}-{high}, so it is harder "
            "than anything the model learned and it may find no valid solution.")
        # the example puzzle (50 givens) is within the training range: solved without a note
        driver.find_element(By.ID, "sudoku-example").click()
        driver.find_element(By.ID, "sudoku-solve").click()  # clears the figures at once
        wait.until(lambda d: d.find_element(By.ID, "sudoku-figures").text)
        assert driver.find_element(By.ID, "sudoku-status").text == "Solved (50 givens)."
        assert not note.is_displayed()
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_sudoku_answer_stays_apart_from_the_givens(sudoku_served, browser):
    """The model's answer is not read back as givens: Solve again counts the same givens, and an edit makes its
    cell a given and clears the answer; a digit typed into a filled cell replaces it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, sudoku_served, "sudoku")
    wait = WebDriverWait(browser, DEADLINE_S)
    status = browser.find_element(By.ID, "sudoku-status")
    cells = browser.find_elements(By.CSS_SELECTOR, "#sudoku-board input")
    board = lambda: "".join(c.get_attribute("value") or "0" for c in cells)  # noqa: E731
    for _ in range(2):  # the example's 50 givens, then the same 50 on the solved board
        browser.find_element(By.ID, "sudoku-solve").click()
        wait.until(lambda d: status.text.startswith(("Solved", "No valid")))
        assert status.text == "Solved (50 givens)."
        assert "0" not in board()
    cells[0].send_keys(Keys.BACKSPACE)  # a given cleared: the answer to the old puzzle goes with it
    assert status.text == "" and board().count("0") == 81 - 49
    assert not browser.find_elements(By.CSS_SELECTOR, "#sudoku-board input.accepted")
    assert browser.execute_script("return readPuzzle()") == "0" + board()[1:]
    cells[1].send_keys("5")  # a filled cell (the example's 9): the typed digit replaces it
    assert cells[1].get_attribute("value") == "5" and "given" in cells[1].get_attribute("class")
    cells[0].send_keys("7")
    assert cells[0].get_attribute("value") == "7" and "given" in cells[0].get_attribute("class")
    assert browser.execute_script("return readPuzzle()").count("0") == 81 - 50
