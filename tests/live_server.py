"""A real uvicorn server on 127.0.0.1 for the HTTP tests (test_server, test_infill), and what they share."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx
import uvicorn

from letterpress import LLM
from letterpress.server.app import ServerConfig, build_app

KEY = "test-key"
MODEL = "letterpress-default"
DEADLINE_S = 90  # generous bound for "eventually" checks; we never assert on how long anything took


class LiveServer:
    """uvicorn serving `build_app(llm, config)` from a background thread, on a socket we already bound."""

    def __init__(self, llm: LLM, config: ServerConfig):
        self.app = build_app(llm, config)
        self.api_key = config.api_key
        self.server_state = self.app.state.server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def wait_healthy(url: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")
