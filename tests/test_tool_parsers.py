"""Tool-call parsers: complete output and streamed deltas (every split), malformed output, the registry."""
from __future__ import annotations

import json
import random

import pytest

from tokenmill.guided.tool_parsers import TOOL_PARSERS, default_tool_parser, get_tool_parser

WEATHER = {"city": "Paris", "days": [1, {"x": "}]"}], "unit": "celsius"}

# (parser, output text, expected content after strip, expected [(name, arguments value)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}\n</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>',
     "Let me check.", [("get_weather", WEATHER), ("now", {})]),
    ("hermes", "<tool_call>{\"name\": \"f\", \"arguments\": {\"q\": \"a\\\"b<tool_call>\"}}</tool_call>",
     None, [("f", {"q": 'a"b<tool_call>'})]),
    ("hermes", "Just text, with a < sign and <tool", "Just text, with a < sign and <tool", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),  # unterminated tag
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\nand more', "and more", [("f", {"a": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": "x"}}',
     None, [("f", {"a": 1}), ("g", {"b": "x"})]),
    ("llama3_json", '  {"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '{"name": "f", "arguments": "{\\"a\\": 2}"}', None, [("f", {"a": 2})]),  # stringified
    ("llama3_json", "Hello there, {not a call}", "Hello there, {not a call}", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": '
     + json.dumps(WEATHER) + "}]", "Sure.", [("f", {"a": 1}), ("g", WEATHER)]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]get_weather[ARGS]' + json.dumps(WEATHER), None,
     [("f", {"a": 1}), ("get_weather", WEATHER)]),
    ("mistral", "plain [TOOL text", "plain [TOOL text", []),
]

MALFORMED = [
    ("hermes", '<tool_call>{"name": "f", "arguments": {bad}}</tool_call> after'),
    ("hermes", "<tool_call>not json at all</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1'),  # cut off
    ("llama3_json", "{not json"),
    ("llama3_json", '{"name": 3, "parameters": {}}'),
    ("mistral", "[TOOL_CALLS] garbage"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a":'),
    ("mistral", "[TOOL_CALLS]not a name![ARGS]{}"),
]


def _values(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def stream(parser, text, sizes):
    """Feed ``text`` in pieces of the given sizes; returns (content, {index: call}, every piece)."""
    s = parser.streamer()
    content, calls, pieces = "", {}, []
    i = 0
    for n in sizes:
        delta, i = text[i:i + n], i + n
        c, ps = s.feed(delta, final=i >= len(text))
        content += c
        pieces += ps
        for p in ps:
            call = calls.setdefault(p["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in p:
                assert call["id"] is None, "an id is sent once, in the call's first piece"
                call.update(id=p["id"], name=p["function"]["name"])
            call["arguments"] += p["function"].get("arguments", "")
        if i >= len(text):
            break
    return content, calls, pieces, s


def splits(text, seed):
    rng = random.Random(seed)
    sizes, left = [], len(text)
    while left > 0:
        sizes.append(rng.randint(1, 6))
        left -= sizes[-1]
    return sizes


@pytest.mark.parametrize("name,text,content,expected", CASES)
def test_parse_complete(name, text, content, expected):
    out = get_tool_parser(name).parse(text)
    assert out.content == content
    assert _values(out.tool_calls) == expected
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in out.tool_calls)
    assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)


@pytest.mark.parametrize("name,text,content,expected", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_matches_complete(name, text, content, expected, seed):
    sizes = [1] * len(text) if seed == 0 else splits(text, seed)
    got_content, calls, pieces, s = stream(get_tool_parser(name), text, sizes)
    assert (got_content.strip() or None) == content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected
    # OpenAI's shape: the first piece of a call has index, id, type and name; the rest only arguments.
    seen = set()
    for p in pieces:
        if p["index"] not in seen:
            seen.add(p["index"])
            assert p["type"] == "function" and p["id"].startswith("call_") and p["function"]["name"]
        else:
            assert set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
    assert sorted(seen) == list(range(len(expected)))
    # the streamer's own record of the complete calls agrees, with the streamed ids
    assert [(c.name, json.loads(c.arguments)) for c in s.calls] == expected
    assert [c.id for c in s.calls] == [calls[i]["id"] for i in sorted(calls)]


def test_content_streams_before_the_call_is_complete():
    p = get_tool_parser("hermes").streamer()
    assert p.feed("Hello ")[0] == "Hello "
    assert p.feed("<tool")[0] == ""  # could be the start of a tag: held back
    c, pieces = p.feed('_call>{"name": "f", "arguments": {"a"')
    assert c == "" and pieces[0]["function"] == {"name": "f", "arguments": '{"a"'}
    c, pieces = p.feed(": 1}}</tool_call>", final=True)
    assert c == "" and pieces == [{"index": 0, "function": {"arguments": ": 1}"}}]
    held = get_tool_parser("hermes").streamer()
    held.feed("x <tool")
    assert held.feed(" is not a tag", final=True)[0] == "<tool is not a tag"


@pytest.mark.parametrize("name,text", MALFORMED)
def test_malformed_is_content(name, text):
    out = get_tool_parser(name).parse(text)
    assert out.tool_calls == []
    assert out.content == text.strip()
    content, calls, _, _ = stream(get_tool_parser(name), text, [1] * len(text))
    for c in calls.values():  # a streamed call announced before the JSON broke: never complete arguments
        with pytest.raises(ValueError):
            json.loads(c["arguments"])
    if not calls:
        assert content.strip() == text.strip()


def test_registry_and_defaults():
    assert {"hermes", "llama3_json", "mistral"} <= set(TOOL_PARSERS)
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'.*hermes"):
        get_tool_parser("nope")
    assert default_tool_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert default_tool_parser("<|python_tag|>") == "llama3_json"
    assert default_tool_parser("<tool_call>") == "hermes" and default_tool_parser(None) == "hermes"
