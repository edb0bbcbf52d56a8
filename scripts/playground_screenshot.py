"""A screenshot of the playground page while a chat reply denoises (the README's docs/playground.png).

    python scripts/playground_screenshot.py [--model MODEL] [--out docs/playground.png]

Starts `letterpress serve` on a free loopback port, opens `/` in the system's headless Chromium (selenium with
`chromium` and `chromedriver` from the distribution), sends a message, and takes the screenshot once the canvas
view has drawn --frames preview frames (or when the reply is done, if it has fewer). The PNG is reduced to a
palette of 128 colours to keep it small.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.browser import headless_chrome  # noqa: E402
from tests.live_server import wait_healthy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="what `letterpress serve` serves (default: the embedded default)")
    p.add_argument("--out", default="docs/playground.png")
    p.add_argument("--message", default="Convert to JSON: name=Ada, year=1815")
    p.add_argument("--frames", type=int, default=6, help="preview frames to wait for before the screenshot")
    args = p.parse_args()

    from PIL import Image
    from selenium.webdriver.common.by import By

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "letterpress.cli", "serve", *([args.model] if args.model else []), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        driver = headless_chrome(1280, 1400)
        try:
            driver.get(url + "/")
            time.sleep(1)
            driver.find_element(By.ID, "chat-input").send_keys(args.message)
            driver.find_element(By.ID, "chat-send").click()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                frames = int(driver.find_element(By.ID, "canvas-frames").get_attribute("data-count"))
                if frames >= args.frames or driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"):
                    break
                time.sleep(0.02)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(30)
    Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
