"""The playground page at `/`: served from the package by a real `letterpress serve` (the shipped default model),
driven in a real headless Chromium (the system's `chromium` and `chromedriver`, through selenium)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from tests.live_server import DEADLINE_S, wait_healthy


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`letterpress serve` with its default model on a free loopback port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "letterpress.cli", "serve", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


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
    body = {"model": "letterpress-default", "prompt": "def add(a, b):", "max_tokens": 24, "seed": 0, "stream": True,
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


def browser_paths() -> tuple[str, str] | None:
    browser = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(browser_paths() is None, reason="no Chromium with chromedriver on PATH (apt-get install chromium "
                                                    "chromium-driver; .ci/run installs them)")
def test_chat_in_a_real_browser(served, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1500"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, DEADLINE_S)
        driver.get(served + "/")
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "letterpress-default")
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
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
