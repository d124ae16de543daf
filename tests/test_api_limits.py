"""Server limits and failures: API keys, a full waiting queue (503 + Retry-After), and an
engine core process that dies under the server (in-flight requests fail, the server exits 1)."""
from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest
from api_conftest import SMALL_ENGINE, assert_error, running_server, wait_for

from tokenmill.testing.tiny_models import make_tiny_model

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    args = [str(make_tiny_model("llama")), *SMALL_ENGINE, "--api-key", KEY, "--max-waiting", "1",
            "--max-num-seqs", "1", "--engine-restarts", "0"]
    with running_server(args) as s:
        yield s


def test_auth(server):
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(server.base_url + "/completions", json=body), 401)
    assert_error(httpx.post(server.base_url + "/completions", json=body,
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(server.base_url + "/models", headers={"Authorization": KEY}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # open for load balancers
    assert httpx.get(server.url + "/metrics").status_code == 200  # and scrapers
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    assert httpx.post(server.base_url + "/completions", json=body, headers=AUTH).status_code == 200


def test_queue_full_503_with_retry_after(server):
    body = {"prompt": "count", "max_tokens": 24, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*(c.post(server.base_url + "/completions", json=body) for _ in range(12)))

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    streamed = httpx.post(server.base_url + "/completions", json={**body, "stream": True}, headers=AUTH)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


def test_core_death_fails_requests_in_flight_and_exits_1(server):
    """Runs last: kills the server's engine core (``--engine-restarts 0``: no restart)."""
    body = {"prompt": "ab", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH, timeout=30) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.kill(server.core_pid(), signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]  # ends, rather than hangs
    assert rest[-1] == "data: [DONE]" and '"engine_dead"' in rest[-2]
    assert server.proc.wait(30) == 1  # a supervisor sees it go
    assert "was not restarted" in server.log()
