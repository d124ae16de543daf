"""Shared fixtures of the reliability suite: bounded servers on 127.0.0.1.

Servers of the default model run it on the CPU with ``--dtype float32`` (``BASE_ARGS``: so that
greedy outputs do not flip on bfloat16 near-ties between batch compositions). A module that
needs several starts them together with :func:`started_together`, which stops them all at the
end, whatever their state.

The hostile-input, fuzz and event-loop modules share one server on a tiny model,
:func:`tiny_server` (session-scoped: it answers requests and holds no state a test could leave
behind for another), started once instead of once per module.

Helpers from ``tests/api_conftest.py`` (``metrics``, ``wait_for``, ``assert_error``) are
re-exported for the suite's modules.
"""
from __future__ import annotations

import contextlib
import shutil
import signal

import httpx
import pytest

from api_conftest import (Server, assert_error, free_port, launch_server, metrics,  # noqa: F401
                          running_server, stop_server, wait_for, wait_healthy)

from tokenmill.testing.tiny_models import make_tiny_model

#: The default model on the CPU, small limits: each test server starts in a few seconds.
BASE_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]
MODEL = "tokenmill-default"


@contextlib.contextmanager
def started_together(**server_args: list[str]):
    """``{name: Server}`` for ``tokenmill serve BASE_ARGS + args``, launched at once and healthy;
    afterwards all are signalled first, then waited for (their drains overlap)."""
    started = {name: launch_server([*BASE_ARGS, *args]) for name, args in server_args.items()}
    try:
        for s in started.values():
            wait_healthy(s, 300)
        yield started
    finally:
        for s in started.values():
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGINT)
        for s in started.values():
            stop_server(s)  # waits (bounded), kills if need be
            s.log_path.unlink(missing_ok=True)


#: The shared tiny server's settings, which its tests read.
TINY = "tiny"
TINY_MAX_N = 8
TINY_MAX_MODEL_LEN = 48
TEMPLATE_TIMEOUT = 3.0
BODY_LIMIT = 11_000_000  # room for a 10 MB prompt; also the cap on a rendered template
#: The tiny model's chat template with a loop over every pair of a message's characters:
#: instant for "hi", hours for 100k characters (the event-loop tests' slow trusted template).
QUADRATIC_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% for c in message['content'] %}"
    "{% for d in message['content'] %}{% endfor %}{% endfor %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """A tiny llama served as ``tiny`` with its template swapped for :data:`QUADRATIC_TEMPLATE`,
    request templates trusted (``--chat-template-timeout`` 3 s), n capped at 8, an 11 MB body cap."""
    model = tmp_path_factory.mktemp("quadratic-template") / "model"
    shutil.copytree(make_tiny_model("llama"), model)
    (model / "chat_template.jinja").write_text(QUADRATIC_TEMPLATE)
    args = [str(model), "--device", "cpu", "--kv-cache-memory", "8MiB", "--max-model-len", str(TINY_MAX_MODEL_LEN), "--served-model-name", TINY, "--max-n", str(TINY_MAX_N),
            "--trust-request-chat-template", "--chat-template-timeout", str(TEMPLATE_TIMEOUT),
            "--max-body-bytes", str(BODY_LIMIT)]
    with running_server(args) as s:
        yield s


def kv_blocks_in_use(url: str) -> float:
    """KV blocks held by live sequences, from ``/metrics`` (pool size minus allocatable blocks)."""
    m = metrics(url)
    return m["tokenmill:kv_cache_blocks"] - m["tokenmill:kv_cache_free_blocks"]


def complete(client: httpx.Client, url: str, prompt, max_tokens: int, **extra) -> httpx.Response:
    """One greedy ``/v1/completions`` call (bounded by the client's timeout)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return client.post(url + "/v1/completions", json=body)
