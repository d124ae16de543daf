"""Tool calling over HTTP (a real server with the bundled model, the openai SDK) and the response
shaping of each parser's output, complete and streamed."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from api_conftest import assert_error, running_server
from tool_fixtures import ASK, CLOCK, ENGINE, MODEL, TOOLS, WEATHER

from tokenmill.api.tool_calls import message, streamer
from tokenmill.guided.tools import ToolCalling, history_for_template

HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def server():
    with running_server(ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenmill.default_model import resolve_model
    from tokenmill.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(None))


def prompt_len(tokenizer, messages, tools=None) -> int:
    from tokenmill.tokenizer import render_chat

    text = render_chat(tokenizer, history_for_template(messages), tools=tools)
    return len(tokenizer.encode(text, add_special_tokens=False))


# -- over HTTP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["auto", "none"])
def test_tools_are_rendered_into_the_prompt(client, tokenizer, choice):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=4,
                                       temperature=0)
    assert r.usage.prompt_tokens == prompt_len(tokenizer, ASK, TOOLS) > prompt_len(tokenizer, ASK) + 50
    msg = r.choices[0].message
    assert isinstance(msg.content, str)
    if choice == "none":  # never parsed
        assert not msg.tool_calls and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_history_with_tool_calls_and_tool_results(client, tokenizer, stream):
    kw = dict(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=6, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        assert r.usage.prompt_tokens == prompt_len(tokenizer, HISTORY, TOOLS)
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == prompt_len(tokenizer, HISTORY, TOOLS)
    # the rendered history holds the call and the result where the template puts them
    from tokenmill.tokenizer import render_chat

    text = render_chat(tokenizer, history_for_template(HISTORY), tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert "<s>tool\n<tool_response>\nsunny, 21 C\n</tool_response></s>" in text


def test_tokenize_renders_tools_like_chat(server, tokenizer):
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": HISTORY, "tools": TOOLS}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] == prompt_len(tokenizer, HISTORY, TOOLS)
    bad = httpx.post(server.url + "/tokenize", json={"messages": ASK, "tools": [{"type": "x"}]}, timeout=30)
    assert_error(bad, 400, "tools[0].type")


def test_auto_streamed_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kw)
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                calls.setdefault(tc.index, "")
                calls[tc.index] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    msg = full.choices[0].message
    assert (content.strip() or None) == msg.content
    assert len(calls) == len(msg.tool_calls or [])
    assert finish == full.choices[0].finish_reason


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages"),
])
def test_invalid_tool_requests_are_400s(server, body, param):
    r = httpx.post(server.base_url + "/chat/completions",
                   json={"model": MODEL, "messages": ASK, "max_tokens": 2, **body}, timeout=30)
    assert_error(r, 400, param)


def _schema(name):
    return next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"]


def _collect(stream):
    """(content, [(id, name, arguments)], finish_reason) of a streamed chat completion."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    calls[tc.index] = [tc.id, tc.function.name, ""]
                calls[tc.index][2] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


# (tool_choice, parallel_tool_calls, names the calls may have)
CONSTRAINED = [
    ({"type": "function", "function": {"name": "get_time"}}, None, {"get_time"}),
    ("required", False, {"get_weather", "get_time"}),
]


@pytest.mark.parametrize("choice,parallel,names", CONSTRAINED)
@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_arguments_validate(client, choice, parallel, names, stream):
    # a 1.25M-parameter model would never write these calls by itself: the grammar makes it
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=1.0, seed=3,
              n=2)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    if stream:
        results = []
        chunks = list(client.chat.completions.create(**kw, stream=True))
        for i in range(2):
            sub = [c for c in chunks if c.choices and c.choices[0].index == i]
            content, calls, finish = _collect(sub)
            results.append((content, calls, finish))
    else:
        r = client.chat.completions.create(**kw)
        results = [(c.message.content, [(t.id, t.function.name, t.function.arguments)
                                        for t in c.message.tool_calls or []], c.finish_reason) for c in r.choices]
    for content, calls, finish in results:
        assert finish == "tool_calls" and not content
        assert len(calls) == 1 or (parallel is not False and len(calls) >= 1)
        for call_id, name, args in calls:
            assert name in names and call_id.startswith("call_")
            jsonschema.validate(json.loads(args), _schema(name))


def test_auto_parses_a_call_the_model_writes(client):
    # force the model's text into the hermes format with a regex, so auto has a real call to parse
    regex = (r'Let me look\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"days": [1-7]\}\}\n</tool_call>')
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=60, temperature=0,
              extra_body={"structured_outputs": {"regex": regex}})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), _schema("get_weather"))
    content, calls, finish = _collect(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content.strip() == "Let me look."
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", json.loads(call.function.arguments))]


# -- response shaping, each parser ---------------------------------------------------------------------------
OUTPUTS = {
    "hermes": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
              '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}; '
                   '{"name": "get_time", "parameters": {"zone": "CET"}}',
    "mistral": 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}, '
               '{"name": "get_time", "arguments": {"zone": "CET"}}]',
}
EXPECTED = [("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "CET"})]


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
@pytest.mark.parametrize("parallel", [True, False])
def test_message_and_stream_shapes(parser, parallel):
    calling = ToolCalling.build(TOOLS, "auto", parallel, parser)
    text = OUTPUTS[parser]
    expected = EXPECTED if parallel else EXPECTED[:1]
    msg, finish = message(calling, text, "stop")
    assert finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == expected
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in msg["tool_calls"])
    assert msg["content"] == (None if parser == "llama3_json" else "Checking.")
    assert message(calling, text, "length")[1] == "length"
    # streamed, a few characters at a time
    s, content, calls, finish = streamer(calling), "", {}, None
    for i in range(0, len(text), 5):
        delta, fr = s.delta(text[i:i + 5], "stop" if i + 5 >= len(text) else None)
        content += delta.get("content", "")
        for p in delta.get("tool_calls", []):
            c = calls.setdefault(p["index"], {"name": p.get("function", {}).get("name"), "args": ""})
            c["args"] += p["function"].get("arguments", "")
        finish = fr or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["args"])) for _, c in sorted(calls.items())] == expected
    assert (content.strip() or None) == msg["content"]


def test_none_is_never_parsed():
    calling = ToolCalling.build(TOOLS, "none", None, "hermes")
    msg, finish = message(calling, OUTPUTS["hermes"], "stop")
    assert msg == {"role": "assistant", "content": OUTPUTS["hermes"]} and finish == "stop"
    assert streamer(calling) is None


# -- offline: LLM.chat ----------------------------------------------------------------------------------------
FORCED = {  # a regex per parser's format, so each parser reads calls the model actually wrote
    "hermes": r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>',
    "llama3_json": r'\{"name": "get_time", "parameters": \{"zone": "(UTC|CET)"\}\}',
    "mistral": r'\[TOOL_CALLS\]\[\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\]',
}


@pytest.fixture(scope="module")
def llm():
    from tokenmill import LLM

    return LLM(device="cpu", kv_cache_memory=8 << 20, max_model_len=1024)


@pytest.mark.parametrize("parser", sorted(FORCED))
def test_llm_chat_each_parser(llm, parser):
    from tokenmill import SamplingParams
    from tokenmill.guided.params import StructuredOutputsParams

    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(regex=FORCED[parser]))
    (out,) = llm.chat(ASK, params, tools=TOOLS, tool_parser=parser)
    (call,) = out.outputs[0].tool_calls
    assert call.name == "get_time" and json.loads(call.arguments)["zone"] in ("UTC", "CET")
    assert len(out.prompt_token_ids) == prompt_len(llm.get_tokenizer(), ASK, TOOLS)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_llm_chat_constrained(llm, choice):
    from tokenmill import SamplingParams

    (out,) = llm.chat(ASK, SamplingParams(temperature=0.8, seed=1, max_tokens=80), tools=TOOLS, tool_choice=choice,
                      parallel_tool_calls=False)
    (call,) = out.outputs[0].tool_calls
    jsonschema.validate(json.loads(call.arguments), _schema(call.name))
    (plain,) = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=4), tools=TOOLS, tool_choice="none")
    assert plain.outputs[0].tool_calls is None
    with pytest.raises(ValueError, match="not in tools"):
        llm.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


# -- strict tools under auto: the parser's structural tag ------------------------------------------------------
STRICT = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}, CLOCK]


def _accepts(matcher, tokenizer, text) -> bool:
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("parser,good,bad", [
    ("hermes", 'Let me see. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"'),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": "UTC"}}',
     '{"name": "get_time", "parameters": {"zone": "PST"'),
])
def test_strict_tools_constrain_the_calls_auto_makes(tokenizer, parser, good, bad):
    from tokenmill.guided import GuidedCompiler, VocabInfo

    calling = ToolCalling.build(STRICT, "auto", None, parser)
    spec = calling.spec()
    assert spec.kind == "structural_tag" and spec.param == "tools"
    compiler = GuidedCompiler(VocabInfo(tokenizer, 4096, [tokenizer.eos_token_id]))
    try:
        grammar = compiler.compile(spec)
        assert _accepts(grammar.matcher(), tokenizer, good)
        assert not _accepts(grammar.matcher(), tokenizer, bad)  # "Lima"/"PST" are not in the enum
        assert _accepts(grammar.matcher(), tokenizer, "free text without a call")
    finally:
        compiler.close()
    parsed = calling.parse(good)
    assert [c.name for c in parsed.tool_calls] == [good.split('"name": "')[1].split('"')[0]]
    with pytest.raises(ValueError, match="strict"):
        ToolCalling.build(STRICT, "auto", None, "mistral")
    assert ToolCalling.build(STRICT, "none", None, "hermes").spec() is None


def test_strict_auto_over_http(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=STRICT, max_tokens=24, temperature=0)
    for call in r.choices[0].message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
    with pytest.raises(openai.BadRequestError, match="strict tool"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=STRICT, max_tokens=2,
                                       response_format={"type": "json_object"})


def test_special_token_markers_are_kept_then_dropped():
    from tokenmill import SamplingParams
    from tokenmill.api.tool_calls import adjust_params

    class Tok:
        all_special_tokens = ["<s>", "</s>", "[TOOL_CALLS]"]

    class Srv:
        tokenizer = Tok()

    calling = ToolCalling.build(TOOLS, "auto", None, "mistral")
    params = adjust_params(Srv(), calling, SamplingParams(max_tokens=8))
    assert params.skip_special_tokens is False and calling.drop == ("<s>", "</s>")
    msg, finish = message(calling, OUTPUTS["mistral"] + "</s>", "stop")
    assert msg["content"] == "Checking." and len(msg["tool_calls"]) == 2 and finish == "tool_calls"
    hermes = ToolCalling.build(TOOLS, "auto", None, "hermes")  # its markers are not special here: unchanged
    assert adjust_params(Srv(), hermes, SamplingParams(max_tokens=8)).skip_special_tokens is True
