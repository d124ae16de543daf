"""The llama3_json and mistral tool-call parsers over HTTP: a real server started with
``--tool-call-parser``, the openai SDK, every tool_choice, streamed and not.

The bundled 1.25M-parameter model never writes a tool call by itself, so ``auto`` and ``none`` get
calls the model really generates by forcing its text into the parser's format with a regex
(``structured_outputs``): the parser then reads text that came out of the engine, token by token
when streamed. ``required`` and named choices are grammar-constrained, so their arguments validate
whatever the model would have written.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from api_conftest import assert_error, running_server
from tool_fixtures import ASK, CLOCK, ENGINE, MODEL, TOOLS, WEATHER

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

_W = r'\{"name": "get_weather", "%s": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'
_T = r'\{"name": "get_time", "%s": \{"zone": "(UTC|CET)"\}\}'
#: Per parser: a regex writing two calls in its format, the content the parser leaves, and (mistral)
#: the v11 form, one ``[TOOL_CALLS]name[ARGS]{...}`` per call.
FORMATS = {
    "llama3_json": {"two": (_W % "parameters") + "; " + (_T % "parameters"), "content": None,
                    "tagged": r"<\|python_tag\|>" + (_T % "parameters")},
    "mistral": {"two": r"Checking\. \[TOOL_CALLS\]\[" + (_W % "arguments") + ", " + (_T % "arguments") + r"\]",
                "content": "Checking.",
                "tagged": r'\[TOOL_CALLS\]get_time\[ARGS\]\{"zone": "(UTC|CET)"\}'},
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def parser(request):
    return request.param


@pytest.fixture(scope="module")
def server(parser):
    with running_server(ENGINE + ["--tool-call-parser", parser]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _complete(client, stream: bool, **kw):
    """``[(content, [(id, name, arguments)], finish_reason)]`` per choice, from either response shape."""
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 80, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        return [(c.message.content, [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []],
                 c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]
    per: dict[int, list] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            state = per.setdefault(ch.index, ["", {}, None])
            state[0] += ch.delta.content or ""
            calls = state[1]
            for tc in ch.delta.tool_calls or []:
                if tc.index not in calls:  # the first piece of a call carries its id, type and name
                    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                else:
                    assert tc.id is None and not tc.function.name, tc
                calls[tc.index][2] += tc.function.arguments or ""
            state[2] = ch.finish_reason or state[2]
    return [(content or None, [tuple(calls[i]) for i in sorted(calls)], finish)
            for content, calls, finish in (per[i] for i in sorted(per))]


def _forced(regex: str) -> dict:
    return {"structured_outputs": {"regex": regex}}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_calls_the_model_writes(client, parser, stream):
    (content, calls, finish), = _complete(client, stream, tool_choice="auto", extra_body=_forced(FORMATS[parser]["two"]))
    assert finish == "tool_calls"
    assert (content.strip() if content else None) == FORMATS[parser]["content"]
    assert [n for _, n, _ in calls] == ["get_weather", "get_time"]
    assert len({i for i, _, _ in calls}) == 2
    for _, name, args in calls:
        jsonschema.validate(json.loads(args), SCHEMAS[name])


def test_auto_streamed_equals_non_streamed(client, parser):
    kw = dict(tool_choice="auto", extra_body=_forced(FORMATS[parser]["two"]), n=2, temperature=1.0, seed=11)
    full = _complete(client, False, **kw)
    streamed = _complete(client, True, **kw)
    strip = [(c.strip() if c else None, [(n, json.loads(a)) for _, n, a in calls], f) for c, calls, f in full]
    assert strip == [(c.strip() if c else None, [(n, json.loads(a)) for _, n, a in calls], f)
                     for c, calls, f in streamed]
    assert len(strip) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_auto_without_parallel_calls_keeps_the_first(client, parser, stream):
    (content, calls, finish), = _complete(client, stream, tool_choice="auto", parallel_tool_calls=False,
                                          extra_body=_forced(FORMATS[parser]["two"]))
    assert finish == "tool_calls" and [n for _, n, _ in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0][2]), SCHEMAS["get_weather"])


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_the_tagged_form(client, parser, stream):
    # llama3_json: after <|python_tag|>; mistral (tokenizer v11+): [TOOL_CALLS]name[ARGS]{...}
    (content, calls, finish), = _complete(client, stream, tool_choice="auto",
                                          extra_body=_forced(FORMATS[parser]["tagged"]))
    assert finish == "tool_calls" and not (content or "").strip()
    (_, name, args), = calls
    assert name == "get_time" and json.loads(args)["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_plain_text_is_content(client, parser, stream):
    (content, calls, finish), = _complete(client, stream, tool_choice="auto", max_tokens=12,
                                          extra_body=_forced(r"The weather is (fine|bad)\."))
    assert calls == [] and finish == "stop" and content in ("The weather is fine.", "The weather is bad.")


@pytest.mark.parametrize("stream", [False, True])
def test_none_leaves_the_calls_as_text(client, parser, stream):
    (content, calls, finish), = _complete(client, stream, tool_choice="none", extra_body=_forced(FORMATS[parser]["two"]))
    assert calls == [] and finish == "stop"
    assert "get_weather" in content and "get_time" in content
    assert json.loads(content[content.index("{"):content.index("}}") + 2])["name"] == "get_weather"


# (tool_choice, parallel_tool_calls, names the calls may have)
CONSTRAINED = [
    ({"type": "function", "function": {"name": "get_time"}}, None, {"get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, False, {"get_weather"}),
    ("required", None, {"get_weather", "get_time"}),
    ("required", False, {"get_weather", "get_time"}),
]


@pytest.mark.parametrize("choice,parallel,names", CONSTRAINED)
@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_arguments_validate(client, parser, choice, parallel, names, stream):
    kw = dict(tool_choice=choice, temperature=1.0, seed=5, n=2, max_tokens=160)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    results = _complete(client, stream, **kw)
    assert len(results) == 2
    for content, calls, finish in results:
        if parallel is None and choice == "required":
            # the array may go on until max_tokens; the calls completed by then are returned
            assert finish in ("tool_calls", "length") and len(calls) >= 1
        else:
            assert finish == "tool_calls" and not content and len(calls) == 1
        for call_id, name, args in calls:
            assert name in names and call_id.startswith("call_")
            jsonschema.validate(json.loads(args), SCHEMAS[name])


def test_strict_tools_under_auto(client, server, parser):
    strict = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}, CLOCK]
    body = {"model": MODEL, "messages": ASK, "tools": strict, "max_tokens": 16, "temperature": 0}
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=120)
    if parser == "mistral":  # its format has no structural tag to constrain: refused, the server keeps serving
        assert_error(r, 400, "tools")
        assert "strict" in r.json()["error"]["message"]
        assert client.models.list().data[0].id == MODEL
        return
    assert r.status_code == 200, r.text
    for call in r.json()["choices"][0]["message"].get("tool_calls") or []:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    # a strict tool constrains the output itself: no second constraint on top
    r = httpx.post(server.base_url + "/chat/completions", json={**body, **_forced("x+")}, timeout=60)
    assert_error(r, 400, "tools")


def test_constrained_choices_refuse_a_second_constraint(server, parser):
    r = httpx.post(server.base_url + "/chat/completions",
                   json={"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 4,
                         **_forced("x+")}, timeout=60)
    assert_error(r, 400, "tool_choice")
