"""Hostile request bodies against a real server: text that is not valid Unicode, bounds on n
and friends, parameters reported under the name the client used. Every bad request is a
400 in OpenAI's error shape naming the field, and the server keeps serving afterwards."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import TINY as MODEL
from conftest import TINY_MAX_N as MAX_N
from conftest import assert_error
LONE = "\ud800abc"
CHAT = {"model": MODEL, "max_tokens": 2}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server(tiny_server):
    return tiny_server


def post(server, path: str, body, **kw) -> httpx.Response:
    """POST ``body`` encoded as ASCII JSON: lone surrogates travel as ``\\ud800`` escapes, as a
    client written in a language with UTF-16 strings sends them."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


def assert_serving(server) -> None:
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


SURROGATE_CASES = {
    "completion prompt": ("/v1/completions", {"model": MODEL, "prompt": LONE, "max_tokens": 2}, "prompt"),
    "batch prompt": ("/v1/completions", {"model": MODEL, "prompt": ["fine", LONE], "max_tokens": 2}, "prompt"),
    "model": ("/v1/completions", {"model": "\ud800", "prompt": "x"}, "model"),
    "stop": ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", LONE]}, "stop"),
    "logit_bias key": ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {LONE: 1}}, "logit_bias"),
    "unknown field": ("/v1/completions", {"model": MODEL, "prompt": "x", "extra_thing": {"k": LONE}}, "extra_thing"),
    "unknown key": ("/v1/completions", {"model": MODEL, "prompt": "x", LONE: 1}, "\\ud800abc"),
    "chat content": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages"),
    "chat content part": ("/v1/chat/completions",
                          {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
                          "messages"),
    "chat role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": LONE, "content": "hi"}]}, "messages"),
    "chat model": ("/v1/chat/completions", {**CHAT, "model": LONE, "messages": USER}, "model"),
    "chat_template": ("/v1/chat/completions", {**CHAT, "messages": USER, "chat_template": "{{ '\udfff' }}"},
                      "chat_template"),
    "chat_template_kwargs": ("/v1/chat/completions", {**CHAT, "messages": USER,
                                                      "chat_template_kwargs": {"x": LONE}}, "chat_template_kwargs"),
    "tokenize prompt": ("/tokenize", {"model": MODEL, "prompt": LONE}, "prompt"),
    "tokenize messages": ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": LONE}]}, "messages"),
    "tokenize model": ("/tokenize", {"model": LONE, "prompt": "x"}, "model"),
    "detokenize model": ("/detokenize", {"model": LONE, "tokens": [1, 2]}, "model"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_lone_surrogate_is_400_naming_the_field(server, case):
    path, body, param = SURROGATE_CASES[case]
    err = assert_error(post(server, path, body), 400, param)
    assert "surrogate" in err["message"]
    assert_serving(server)


def test_surrogates_in_every_encoding(server):
    # Raw CESU-8 bytes of U+D800 (Python's json module decodes them with surrogatepass).
    raw = b'{"model": "tiny", "max_tokens": 2, "prompt": "\xed\xa0\x80abc"}'
    assert_error(post(server, "/v1/completions", raw), 400, "prompt")
    # Bytes that are not UTF-8 at all.
    raw = b'{"model": "tiny", "max_tokens": 2, "prompt": "\xff\xfe"}'
    assert_error(post(server, "/v1/completions", raw), 400)
    # A lone low surrogate, and one in a streaming request.
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "a\udc00", "stream": True}), 400, "prompt")
    # A valid pair is one character and fine.
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "smile \ud83d\ude00", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    toks = post(server, "/tokenize", {"model": MODEL, "prompt": "\ud83d\ude00"})
    assert toks.status_code == 200 and toks.json()["count"] >= 1
    assert_serving(server)


def test_n_and_best_of_are_capped(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    err = assert_error(post(server, "/v1/completions", {**body, "n": MAX_N + 1}), 400, "n")
    assert str(MAX_N) in err["message"]
    assert_error(post(server, "/v1/completions", {**body, "n": 20000}), 400, "n")
    assert_error(post(server, "/v1/completions", {**body, "best_of": MAX_N + 1}), 400, "best_of")
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "messages": USER, "n": MAX_N + 1}), 400, "n")
    ok = post(server, "/v1/completions", {**body, "n": MAX_N})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_N


def test_stream_options_requires_stream(server):
    opts = {"stream_options": {"include_usage": True}}
    err = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", **opts}), 400,
                       "stream_options")
    assert "stream" in err["message"]
    assert_error(post(server, "/v1/chat/completions", {**CHAT, "messages": USER, "stream": False, **opts}), 400,
                 "stream_options")
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "stream": True, **opts})
    assert ok.status_code == 200 and '"usage"' in ok.text
    # null means "not given"
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "stream_options": None})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("value", [-1, 10**6])
def test_max_completion_tokens_is_named(server, value):
    chat = {"model": MODEL, "messages": USER, "max_completion_tokens": value}
    err = assert_error(post(server, "/v1/chat/completions", chat), 400, "max_completion_tokens")
    assert err["message"].startswith("max_completion_tokens")
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_completion_tokens": value}),
                 400, "max_completion_tokens")
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": value}), 400,
                 "max_tokens")


def test_models_do_not_expose_the_path(server):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    assert all(m["root"] == m["id"] for m in data), data
    assert "/" not in json.dumps(data)


LIST_BOUNDS = {
    "stop count": ({"stop": ["s%d" % i for i in range(65)]}, "stop"),
    "stop length": ({"stop": "x" * 4097}, "stop"),
    "stop_token_ids count": ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
    "prompt batch": ({"prompt": ["x"] * 2049}, "prompt"),
}


@pytest.mark.parametrize("case", list(LIST_BOUNDS))
def test_list_fields_are_bounded(server, case):
    extra, param = LIST_BOUNDS[case]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1, **extra}
    assert_error(post(server, "/v1/completions", body), 400, param)
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1,
                                          "stop": ["s%d" % i for i in range(64)], "stop_token_ids": [1] * 8})
    assert ok.status_code == 200, ok.text
