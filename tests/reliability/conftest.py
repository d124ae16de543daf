"""Shared fixtures of the reliability suite: bounded servers on 127.0.0.1.

Every server here runs the bundled default model on the CPU with ``--dtype float32`` (so that
greedy outputs do not flip on bfloat16 near-ties between batch compositions) and is killed
if it outlives its test module. Use :func:`reliability_server` in a module-scoped fixture::

    @pytest.fixture(scope="module")
    def server():
        with reliability_server("--kv-cache-memory", "512KiB") as s:
            yield s

Helpers from ``tests/api_conftest.py`` (``metrics``, ``wait_for``, ``assert_error``) are
re-exported for the suite's modules.
"""
from __future__ import annotations

import contextlib

import httpx

from api_conftest import (Server, assert_error, free_port, launch_server, metrics, running_server,  # noqa: F401
                          stop_server, wait_for, wait_healthy)

#: The default model on the CPU, small limits: each test server starts in a few seconds.
BASE_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
MODEL = "tokenmill-default"


@contextlib.contextmanager
def reliability_server(*args: str, env: dict | None = None, timeout: float = 300.0):
    """A healthy ``tokenmill serve`` (``BASE_ARGS`` + ``args``) for the block; always stopped after."""
    server = launch_server([*BASE_ARGS, *args], env)
    try:
        wait_healthy(server, timeout)
        yield server
    finally:
        stop_server(server)
        server.log_path.unlink(missing_ok=True)


def kv_blocks_in_use(url: str) -> float:
    """KV blocks held by live sequences, from ``/metrics`` (pool size minus allocatable blocks)."""
    m = metrics(url)
    return m["tokenmill:kv_cache_blocks"] - m["tokenmill:kv_cache_free_blocks"]


def complete(client: httpx.Client, url: str, prompt, max_tokens: int, **extra) -> httpx.Response:
    """One greedy ``/v1/completions`` call (bounded by the client's timeout)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return client.post(url + "/v1/completions", json=body)
