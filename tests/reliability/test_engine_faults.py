"""A dead or hung engine core: the API notices, fails what is in flight clearly, and recovers or exits.

- ``kill -9`` of the core: requests in flight fail with 503, ``/health`` is 503 while the core
  restarts, then 200 and serving again; past ``--engine-restarts`` the server exits with status 1.
- ``SIGSTOP`` of the core: ``/health`` turns 503 once the step loop is silent for
  ``--engine-stall-timeout``; requests fail at ``--request-timeout`` with a 504 (a stream with an
  error event) and, once the core runs again, their blocks are free.
- ``SIGTERM`` with a request that cannot finish: the server is down within ``--shutdown-timeout``.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from conftest import MODEL, assert_error, complete, kv_blocks_in_use, metrics, started_together, wait_for

LONG = {"model": MODEL, "prompt": "def main(", "max_tokens": 240, "temperature": 0, "ignore_eos": True}


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return -1


def _stream_after_first_chunk(url: str, action):
    """Open a long stream, run ``action()`` after its first chunk, return the remaining data lines."""
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        action()
        return [line for line in lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def servers():
    """Both servers of this module, started together; each test ends its own server's life."""
    with started_together(restartable=["--engine-restarts", "1", "--kv-cache-memory", "2MiB"],
                          hangable=["--engine-stall-timeout", "3", "--request-timeout", "4", "--shutdown-timeout", "2",
                                    "--kv-cache-memory", "2MiB"]) as started:
        yield started


def _running(url: str) -> float:
    return metrics(url)["tokenmill:num_requests_running"]


def test_kill_9_fails_in_flight_with_503_restarts_then_past_the_limit_exits_1(servers):
    server = servers["restartable"]
    url, seen = server.url, []

    def watch():  # /health from the kill on, until it is back to 200 after a 503
        for _ in range(1500):
            seen.append(_health(url))
            if seen[-1] == 200 and 503 in seen:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    # A non-streaming request in flight alongside the stream: it fails with a 503 too.
    plain = {}
    background = threading.Thread(target=lambda: plain.setdefault(
        "r", httpx.post(url + "/v1/completions", json=LONG, timeout=60)), daemon=True)

    def kill():
        background.start()
        wait_for(lambda: _running(url) >= 2, timeout=30, interval=0.05)  # both requests are running
        os.kill(server.core_pid(), signal.SIGKILL)
        watcher.start()

    rest = _stream_after_first_chunk(url, kill)
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert err["code"] == "engine_dead" and "not running" in err["message"]
    background.join(60)
    assert_error(plain["r"], 503)
    assert plain["r"].json()["error"]["code"] == "engine_dead" and plain["r"].headers["retry-after"]
    # Asked while the core restarts (it takes seconds to load): a 503 too, not a hang or a 500.
    during = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60)
    assert_error(during, 503)
    assert "restarting" in during.json()["error"]["message"]
    wait_for(lambda: _health(url) == 200, timeout=90, interval=0.2)
    watcher.join(10)
    assert 503 in seen  # unhealthy in between
    with httpx.Client(timeout=60) as client:
        r = complete(client, url, "import os", 4)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert "engine core restarted" in server.log()
    os.kill(server.core_pid(), signal.SIGKILL)  # the second death: --engine-restarts 1 is spent
    assert server.proc.wait(30) == 1
    assert "was not restarted" in server.log()


def test_sigstop_fails_health_times_requests_out_and_sigterm_drain_is_bounded(servers):
    server = servers["hangable"]
    url, pid = server.url, server.core_pid()
    assert _health(url) == 200
    rest = []
    try:
        t0 = time.monotonic()
        rest = _stream_after_first_chunk(url, lambda: os.kill(pid, signal.SIGSTOP))
        waited = time.monotonic() - t0
        r = httpx.post(url + "/v1/completions", json=LONG, timeout=30)  # never accepted: the core is stopped
        assert_error(r, 504)
        assert r.json()["error"]["code"] == "request_timeout"
        wait_for(lambda: _health(url) == 503, timeout=10)
        body = httpx.get(url + "/health", timeout=5).json()
        assert body["error"]["code"] == "engine_stalled" and "no progress" in body["error"]["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert 3 < waited < 20
    assert rest[-1] == "data: [DONE]" and '"request_timeout"' in rest[-2]
    wait_for(lambda: _health(url) == 200, timeout=10)
    wait_for(lambda: kv_blocks_in_use(url) == 0, timeout=10)  # the timed-out requests' blocks are freed
    with httpx.Client(timeout=60) as client:
        assert complete(client, url, "import os", 4).status_code == 200

    # SIGTERM while a request that can never finish is in flight: down within --shutdown-timeout.
    started = threading.Event()

    def hold():
        try:
            _stream_after_first_chunk(url, started.set)
        except httpx.HTTPError:
            pass

    client = threading.Thread(target=hold, daemon=True)
    client.start()
    assert started.wait(30)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        assert time.monotonic() - t0 < 20  # 2 s drain, then the core is stopped (killed if need be)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    client.join(10)
