"""Headless Chromium for the playground page's test and scripts/playground_screenshot.py: the system's `chromium`
and `chromedriver` (Debian's packages; .ci/run installs them), driven by selenium. Nothing is downloaded."""

from __future__ import annotations

import shutil


def browser_paths() -> tuple[str, str] | None:
    """(browser, chromedriver) found on PATH, or None."""
    browser = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


NO_BROWSER = "no Chromium with chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run installs them)"


def headless_chrome(width: int = 1280, height: int = 1500):
    """A selenium Chrome driver on the system's binaries, collecting the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
