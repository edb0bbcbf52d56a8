"""Fixtures shared by the HTTP tests: an `openai` client and a raw httpx client for a module's `server`
fixture (a tests.live_server.LiveServer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The engine, CLI and server tests were written against tiny-code, which writes a whole canvas for any prompt
# (they count exact numbers of tokens); the default model, tiny-tasks, stops after a short answer. They keep
# running tiny-code as "the default" (child processes inherit this); tests/test_default_model.py checks the
# real default with the variable removed.
if (Path(__file__).resolve().parent.parent / "letterpress" / "assets" / "tiny_code" / "model.safetensors").is_file():
    os.environ.setdefault("LETTERPRESS_DEFAULT_MODEL", "tiny_code")


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    httpx = pytest.importorskip("httpx")
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        yield c
