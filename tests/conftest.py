"""Fixtures shared by the HTTP tests: an `openai` client and a raw httpx client for a module's `server`
fixture (a tests.live_server.LiveServer)."""

from __future__ import annotations

import pytest


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
