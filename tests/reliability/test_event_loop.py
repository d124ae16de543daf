"""One request must not freeze the API for everyone: tokenization and chat templates run off
the event loop, a request's own chat template (allowed here with
``--trust-request-chat-template``) is bounded in time, output and memory, and the model's own
template (here one whose cost grows with the square of a message's length) in time."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import TEMPLATE_TIMEOUT as TIMEOUT
from conftest import TINY as MODEL
from conftest import assert_error

USER = [{"role": "user", "content": "hi"}]
NESTED = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
          "{% endfor %}{% endfor %}{% endfor %}")


@pytest.fixture
def server(tiny_server):
    """The shared tiny server: request templates trusted, the model's own template quadratic."""
    return tiny_server


def assert_responsive(lat: list[float]) -> None:
    """/health answered within 200 ms while the slow request ran (before: one poll waited for all of it).
    A shared CI machine can deschedule the server for a moment, so one poll in ten may be slower."""
    lat = sorted(lat)
    assert lat[int(len(lat) * 0.9)] < 0.2 and lat[-1] < 2.0, lat[-5:]


def health_latencies_during(server, slow_request) -> tuple[list[float], object]:
    """Run ``slow_request()`` in a thread; poll /health until it returns. Returns the latencies and its result."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", slow_request()))
    worker.start()
    latencies = []
    with httpx.Client(timeout=30) as c:
        while worker.is_alive():
            t = time.perf_counter()
            assert c.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.05)
    worker.join()
    return latencies, result["r"]


def chat(server, **kw) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": USER,
                                                                    "max_tokens": 2, **kw}, timeout=60)


def test_health_answers_while_a_10mb_prompt_is_tokenized(server):
    prompt = "hello " * (10_000_000 // 6)  # 10 MB
    lat, resp = health_latencies_during(server, lambda: httpx.post(
        server.base_url + "/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}, timeout=120))
    err = assert_error(resp, 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "tokens long" in err["message"]
    assert len(lat) >= 3, lat  # the prompt took a while: /health was asked during it
    lat.sort()
    print(f"/health during a 10 MB prompt: {len(lat)} polls, median {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms")
    assert_responsive(lat)


def test_health_answers_while_a_10mb_embeddings_batch_is_tokenized(server):
    batch = ["hello " * 2700] * 600  # 600 inputs of 16 kB: each short, together 10 MB
    lat, resp = health_latencies_during(server, lambda: httpx.post(
        server.base_url + "/embeddings", json={"model": MODEL, "input": batch}, timeout=120))
    err = assert_error(resp, 400, "input")
    assert err["code"] == "context_length_exceeded"
    assert len(lat) >= 3, lat
    assert_responsive(lat)


def test_nested_loop_template_is_stopped_and_loop_stays_free(server):
    lat, resp = health_latencies_during(server, lambda: chat(server, chat_template=NESTED))
    err = assert_error(resp, 400, "chat_template")
    assert f"{TIMEOUT:g} s" in err["message"]
    lat.sort()
    print(f"/health during a nested-loop template: {len(lat)} polls, max {lat[-1] * 1000:.0f} ms")
    assert_responsive(lat)
    # The killed renderer was replaced: the next request's template renders.
    ok = chat(server, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert ok.status_code == 200, ok.text


def test_the_models_own_template_stops_at_the_deadline(server):
    long = [{"role": "user", "content": "x" * 100_000}]
    t0 = time.monotonic()
    lat, resp = health_latencies_during(server, lambda: chat(server, messages=long))
    took = time.monotonic() - t0
    err = assert_error(resp, 400, "messages")
    assert f"within {TIMEOUT:g} s" in err["message"]
    assert took < TIMEOUT + 10, took
    assert_responsive(lat)
    assert chat(server).status_code == 200  # the worker thread is free again


def test_template_output_and_memory_are_bounded(server):
    # 12M characters from a 100-byte request: more than --max-body-bytes allows a prompt to be.
    err = assert_error(chat(server, chat_template="{{ 'ab ' * 4000000 }}"), 400, "chat_template")
    assert "characters, more than the limit" in err["message"]
    err = assert_error(chat(server, chat_template="{{ 'ab' * 10**10 }}"), 400, "chat_template")
    assert "memory" in err["message"]
    err = assert_error(chat(server, chat_template="{{ raise_exception('no') }}"), 400, "chat_template")
    assert "no" in err["message"]
    assert_error(chat(server, chat_template="{% for %}"), 400, "chat_template")


def test_request_template_is_honoured(server):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ bos_token }}"
    resp = chat(server, chat_template=template, add_special_tokens=False)
    assert resp.status_code == 200, resp.text
    toks = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "<user>hi<s>",
                                                      "add_special_tokens": False}).json()
    assert resp.json()["usage"]["prompt_tokens"] == toks["count"]
    # The model's own template still applies when the request sends none.
    assert chat(server).status_code == 200
