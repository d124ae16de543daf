"""Structured output over HTTP with the openai SDK: response_format (text / json_object /
json_schema), vLLM's structured_outputs and guided_* fields, both backends, streaming and not,
n > 1, chunked prefill and forced preemption, and 400s naming the parameter for invalid specs
(the server keeps serving)."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from api_conftest import SMALL_ENGINE, metrics, running_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"},
    "ok": {"type": "boolean"}}, "required": ["color", "n", "ok"], "additionalProperties": False}
#: Six fixed keys: ~45 tokens of output, three blocks per sequence.
FIXED = {"type": "object", "properties": {
    "status": {"enum": ["active", "inactive", "banned"]}, "level": {"type": "integer", "minimum": 0, "maximum": 9},
    "region": {"enum": ["north", "south"]}, "tier": {"enum": ["gold", "silver", "bronze"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 99}, "verified": {"type": "boolean"}},
    "required": ["status", "level", "region", "tier", "score", "verified"], "additionalProperties": False}
REGEX = r"(ab|c)[0-9]{2,4}-[xyz]"
EBNF = 'root ::= "x" digit digit "!"\ndigit ::= [0-9]'
# json_object may go on forever with a tiny model; compact JSON keeps the other JSON cases short
MESSAGES = [{"role": "user", "content": "Give me a record."}]


#: KV blocks of the test server: 12 x 16 tokens holds two or three constrained sequences of FIXED with a
#: 50-token prompt, so six concurrent requests with n=2 run the pool dry and sequences are preempted
NUM_KV_BLOCKS = 12


@pytest.fixture(scope="module")
def server():
    # a small token budget so prompts are prefilled in chunks
    with running_server([*SMALL_ENGINE, "--max-num-batched-tokens", "16", "--num-kv-blocks",
                         str(NUM_KV_BLOCKS)]) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def _chat(client, stream=False, messages=MESSAGES, **kw):
    kw.setdefault("max_tokens", 80)
    kw.setdefault("temperature", 1.0)
    kw.setdefault("seed", 1)
    if not stream:
        resp = client.chat.completions.create(model="tokenmill-default", messages=messages, **kw)
        return [(c.message.content, c.finish_reason) for c in sorted(resp.choices, key=lambda c: c.index)]
    texts, finish = {}, {}
    for chunk in client.chat.completions.create(model="tokenmill-default", messages=messages, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return [(texts[i], finish[i]) for i in sorted(texts)]


def _valid_json(text):
    jsonschema.validate(json.loads(text), SCHEMA)


CASES = {
    "response_format_json_schema": (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "rec", "schema": SCHEMA, "strict": True}}), _valid_json),
    "response_format_json_object": (dict(response_format={"type": "json_object"}),
                                    lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
    "structured_outputs_json": (dict(extra_body={"structured_outputs": {"json": SCHEMA}}), _valid_json),
    "structured_outputs_regex": (dict(extra_body={"structured_outputs": {"regex": REGEX}}),
                                 lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "structured_outputs_choice": (dict(extra_body={"structured_outputs": {"choice": ["yes", "no"]}}),
                                  lambda t: t in ("yes", "no") or pytest.fail(t)),
    "structured_outputs_grammar": (dict(extra_body={"structured_outputs": {"grammar": EBNF}}),
                                   lambda t: re.fullmatch(r"x[0-9]{2}!", t) or pytest.fail(t)),
    "guided_json": (dict(extra_body={"guided_json": SCHEMA}), _valid_json),
    "guided_regex": (dict(extra_body={"guided_regex": REGEX}), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "guided_choice": (dict(extra_body={"guided_choice": ["left", "right"]}),
                      lambda t: t in ("left", "right") or pytest.fail(t)),
    "guided_grammar": (dict(extra_body={"guided_grammar": EBNF}),
                       lambda t: re.fullmatch(r"x[0-9]{2}!", t) or pytest.fail(t)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chat_structured_outputs(client, case):
    kw, check = CASES[case]
    stream = list(CASES).index(case) % 2 == 1  # half of the fields streamed, half not
    for text, finish in _chat(client, stream=stream, n=2, **kw):
        assert finish == "stop", text
        check(text)


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_backend_choice_per_request(client, backend, stream):
    body = {"structured_outputs": {"json": SCHEMA, "backend": backend}}
    for text, finish in _chat(client, stream=stream, extra_body=body):
        assert finish == "stop"
        _valid_json(text)
    for text, _ in _chat(client, stream=stream, extra_body={"guided_regex": REGEX, "guided_decoding_backend": backend}):
        assert re.fullmatch(REGEX, text), text


TAG = {"type": "structural_tag", "format": {
    "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
    "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {
        "city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}}


def _tag(text):
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.S)
    assert m and json.loads(m.group(1))["city"] in ("Oslo", "Rome"), text


#: every spec kind: (structured_outputs fields, check, backends that compile it)
KINDS = {
    "json": ({"json": SCHEMA, "disable_any_whitespace": True}, _valid_json, ("xgrammar", "outlines")),
    "json_object": ({"json_object": True, "disable_any_whitespace": True},
                    lambda t: isinstance(json.loads(t), dict) or pytest.fail(t), ("xgrammar", "outlines")),
    "regex": ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t), ("xgrammar", "outlines")),
    "choice": ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no") or pytest.fail(t), ("xgrammar", "outlines")),
    "grammar": ({"grammar": EBNF}, lambda t: re.fullmatch(r"x[0-9]{2}!", t) or pytest.fail(t), ("xgrammar",)),
    "structural_tag": ({"structural_tag": TAG}, _tag, ("xgrammar",)),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_every_kind_through_each_backend(client, kind, backend, stream):
    fields, check, backends = KINDS[kind]
    body = {"structured_outputs": {**fields, "backend": backend}}
    if backend not in backends:  # refused up front, naming the field, never silently unconstrained
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, stream=stream, extra_body=body)
        assert info.value.body["param"] == f"structured_outputs.{kind}", info.value.body
        return
    outs = _chat(client, stream=stream, n=2, extra_body=body, max_tokens=120)
    assert len(outs) == 2
    for text, finish in outs:
        assert finish == "stop", text
        check(text)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_response_format_structural_tag(client, stream):
    # vLLM's response_format type; here in xgrammar's form, whose tag is the whole output
    for text, finish in _chat(client, stream=stream, n=2, response_format=TAG):
        assert finish == "stop"
        _tag(text)
    legacy = {"type": "structural_tag", "structures": [{"begin": "<c>", "schema": SCHEMA, "end": "</c>"}],
              "triggers": ["<c>"]}
    ((text, _),) = _chat(client, stream=stream, response_format=legacy, max_tokens=6)
    assert isinstance(text, str)  # free text until the trigger: accepted, compiled, served


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_response_format_and_guided_choice(client, stream):
    kw = dict(model="tokenmill-default", prompt="The record:", max_tokens=80, n=2, seed=3,
              extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
    if stream:
        texts = {}
        for chunk in client.completions.create(stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        outs = list(texts.values())
    else:
        outs = [c.text for c in client.completions.create(**kw).choices]
    assert len(outs) == 2
    for t in outs:
        _valid_json(t)
    resp = client.completions.create(model="tokenmill-default", prompt="Pick:", max_tokens=10,
                                     extra_body={"guided_choice": ["alpha", "beta"]})
    assert resp.choices[0].text in ("alpha", "beta")


def test_response_format_text_is_unconstrained(client):
    ((text, _),) = _chat(client, response_format={"type": "text"}, max_tokens=5, temperature=0)
    assert isinstance(text, str)


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
    (dict(extra_body={"structured_outputs": {"grammar": 'root ::= "a" |'}}), "structured_outputs.grammar"),
    (dict(extra_body={"structured_outputs": {"json": "{not json"}}), "structured_outputs.json"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"jsonn": {}}}), "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"grammar": 'root ::= "a"', "backend": "outlines"}}),
     "structured_outputs.grammar"),
    (dict(extra_body={"guided_regex": "[z-a]"}), "guided_regex"),
    (dict(extra_body={"guided_choice": []}), "guided_choice"),
    (dict(extra_body={"guided_regex": "a", "guided_decoding_backend": "guidance"}), "guided_decoding_backend"),
    (dict(extra_body={"guided_regex": "a", "guided_json": {"type": "object"}}), "guided_regex"),
    (dict(extra_body={"guided_regex": "a", "guided_whitespace_pattern": " *"}), "guided_whitespace_pattern"),
    (dict(extra_body={"guided_whitespace_pattern": " *"}), "guided_whitespace_pattern"),
    (dict(extra_body={"guided_json": SCHEMA, "guided_whitespace_pattern": " *", "guided_decoding_backend": "xgrammar"}),
     "guided_whitespace_pattern"),
    (dict(extra_body={"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " ", "backend": "xgrammar"}}),
     "structured_outputs.whitespace_pattern"),
    (dict(extra_body={"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "("}}),
     "structured_outputs.whitespace_pattern"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "disable_additional_properties": True}}),
     "structured_outputs.disable_additional_properties"),
    (dict(extra_body={"structured_outputs": {"regex": r"\p{L}+", "disable_fallback": True}}), "structured_outputs.regex"),
])
def test_invalid_specs_are_400_naming_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, **kw)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param, err
    # and the server keeps serving
    ((text, _),) = _chat(client, extra_body={"guided_choice": ["ok"]})
    assert text == "ok"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_structured_outputs_options(client, stream):
    # whitespace_pattern: every whitespace is one newline (auto goes to outlines: xgrammar cannot)
    for body in ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": r"\n"}},
                 {"guided_json": SCHEMA, "guided_whitespace_pattern": r"\n"}):
        for text, finish in _chat(client, stream=stream, n=2, extra_body=body):
            assert finish == "stop", text
            _valid_json(text)
            assert " " not in text and text.replace("\n", "") == json.dumps(json.loads(text), separators=(",", ":"))
    # disable_additional_properties: an object schema that lists no properties holds none, on both backends
    schema = {"type": "object", "properties": {"meta": {"type": "object"}, "ok": {"type": "boolean"}},
              "required": ["meta", "ok"]}
    for backend in ("xgrammar", "outlines"):
        body = {"structured_outputs": {"json": schema, "backend": backend, "disable_any_whitespace": True,
                                       "disable_additional_properties": True}}
        for text, finish in _chat(client, stream=stream, n=2, extra_body=body, seed=11):
            assert finish == "stop" and json.loads(text)["meta"] == {}, text
    # disable_fallback where xgrammar compiles the spec: served as usual (a null option means its default)
    body = {"structured_outputs": {"regex": REGEX, "disable_fallback": True, "disable_any_whitespace": None}}
    for text, _ in _chat(client, stream=stream, extra_body=body):
        assert re.fullmatch(REGEX, text), text


def test_disable_fallback_error_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, extra_body={"structured_outputs": {"regex": r"\p{L}+", "disable_fallback": True}})
    assert "structured_outputs.disable_fallback is set" in info.value.body["message"], info.value.body
    ((text, _),) = _chat(client, extra_body={"structured_outputs": {"regex": r"\p{L}{1,4}"}}, temperature=0)
    assert 1 <= len(text) <= 4 and text.isalpha(), text  # without the flag auto falls back to outlines


def _preemptions(server) -> float:
    return metrics(server.url).get("tokenmill:num_preemptions_total", 0.0)


def test_preemption_keeps_concurrent_constrained_outputs_valid(server, client):
    """Twelve constrained sequences at once (json schema on both backends, n=2, streamed and not; distinct
    50-token prompts, prefilled in chunks) in a pool that holds two or three: sequences are preempted and
    recomputed, and every output still validates (the matcher follows the recomputed sequence)."""
    before = _preemptions(server)
    ask = ("a customer account with a status, a level, a region, a tier, a score and whether it was verified. "
           "Write it as JSON.")
    jobs = [dict(stream=i % 2 == 1, n=2, seed=i, max_tokens=100,
                 messages=[{"role": "user", "content": f"Record {i} of the catalogue: {ask}"}],
                 extra_body={"structured_outputs": {"json": FIXED, "disable_any_whitespace": True,
                                                    "backend": ("xgrammar", "outlines")[i % 3 == 0]}})
            for i in range(6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda kw: _chat(client, **kw), jobs))
    assert _preemptions(server) > before, "the small KV pool was meant to force preemption"
    for outs in results:
        assert len(outs) == 2
        for text, finish in outs:
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), FIXED)
