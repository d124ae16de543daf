"""Structured output through the engine (offline ``LLM``): every spec kind through both backends,
n > 1, chunked prefill with forced preemption, prefix caching, compilation off the step loop,
jump-forward decoding, invalid specs, and a JSON-schema property test.

The bundled model is tiny and random-ish: what it would write is not JSON. The constraint alone
must make the output valid.
"""
import json
import re
import threading

import pytest

from tokenmill.guided import GuidedSpecError, StructuredOutputsParams
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

jsonschema = pytest.importorskip("jsonschema")

PROMPT = "Describe the user as JSON:"
SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "name": {"type": "string", "maxLength": 8}, "count": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["color", "ok", "name", "count", "tags"], "additionalProperties": False}
#: Objects of fixed keys with enum and integer values: what jump-forward saves most on.
FIXED = {"type": "object", "properties": {
    "status": {"enum": ["active", "inactive", "banned"]}, "level": {"type": "integer"},
    "region": {"enum": ["north", "south"]}, "tier": {"enum": ["gold", "silver", "bronze"]},
    "score": {"type": "integer"}, "verified": {"type": "boolean"}},
    "required": ["status", "level", "region", "tier", "score", "verified"], "additionalProperties": False}
REGEX = r"(ab|c)[0-9]{2,4}-[xyz]"
CHOICES = ["yes", "no", "maybe not"]
EBNF = 'root ::= "x" digit digit "!"\ndigit ::= [0-9]'
TAG = {"type": "structural_tag", "format": {
    "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
    "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {
        "city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}}


def _json(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema)


def _tag(text):
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.S)
    assert m, text
    assert json.loads(m.group(1))["city"] in ("Oslo", "Rome")


def _object(text):
    assert isinstance(json.loads(text), dict), text


#: kind -> (StructuredOutputsParams fields, check of the text, backends that support it)
CASES = {
    "json": (dict(json=SCHEMA, disable_any_whitespace=True), _json(SCHEMA), ("xgrammar", "outlines")),
    "json_object": (dict(json_object=True, disable_any_whitespace=True), _object, ("xgrammar", "outlines")),
    "regex": (dict(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t), ("xgrammar", "outlines")),
    "choice": (dict(choice=CHOICES), lambda t: t in CHOICES or pytest.fail(t), ("xgrammar", "outlines")),
    "grammar": (dict(grammar=EBNF), lambda t: re.fullmatch(r"x[0-9]{2}!", t) or pytest.fail(t), ("xgrammar",)),
    "structural_tag": (dict(structural_tag=TAG), _tag, ("xgrammar",)),
}


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=16, max_model_len=512, seed=0, dtype="float32")


def _params(fields, backend=None, **kw):
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured_outputs=StructuredOutputsParams(backend=backend, **fields), **kw)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_every_kind_through_each_backend(llm, kind, backend):
    fields, check, backends = CASES[kind]
    if backend not in backends:
        with pytest.raises(GuidedSpecError, match="does not support"):
            llm.generate(PROMPT, _params(fields, backend))
        return
    # greedy, and n=3 random continuations (each follows the grammar with its own matcher)
    params = [_params(fields, backend, temperature=0), _params(fields, backend, temperature=1.0, n=3, seed=7)]
    outs = llm.generate([PROMPT, PROMPT], params)
    completions = [c for o in outs for c in o.outputs]
    assert len(completions) == 4
    for c, p in zip(completions, [params[0]] + [params[1]] * 3):
        if kind in ("json_object", "structural_tag") and c.finish_reason == "length":
            # these may go on forever (the tiny model keeps adding keys, or pads): a valid prefix then
            assert _accepted(llm, p.structured_outputs, c.token_ids), c.text
            continue
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        check(c.text)


def _accepted(llm, so, token_ids) -> bool:
    """Whether a fresh matcher of ``so`` accepts every token (the output is a prefix the grammar allows)."""
    m = llm.engine.guided.compiler.compile(so.spec, so.backend).matcher()
    return all(m.accept_token(t) for t in token_ids)


def test_preemption_and_chunked_prefill_keep_outputs_valid():
    # 24 blocks of 16 tokens for 8 sequences of ~60 tokens: the pool runs dry and sequences are
    # recomputed; a 24-token budget splits every prompt into chunks
    llm = LLM(num_blocks=24, block_size=16, max_num_batched_tokens=24, max_num_seqs=8, max_model_len=256, dtype="float32")
    prompts = [f"Record number {i} of the catalogue, as JSON please:" for i in range(8)]
    params = _params(dict(json=FIXED, disable_any_whitespace=True), temperature=1.0, seed=3, max_tokens=80)
    outs = llm.generate(prompts, params)
    assert llm.stats().num_preemptions > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), FIXED)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks or llm.engine.kv.usage < 1.0


def test_prefix_caching_still_serves_constrained_requests(llm):
    prompt = "A long shared system prompt about colours and counts, repeated for caching. " * 3
    p = _params(dict(json=SCHEMA, disable_any_whitespace=True), temperature=0)
    first = llm.generate(prompt, p)[0]
    second = llm.generate(prompt, p)[0]
    assert second.num_cached_tokens > 0
    assert first.outputs[0].text == second.outputs[0].text
    jsonschema.validate(json.loads(second.outputs[0].text), SCHEMA)


def test_compilation_does_not_block_other_requests(llm):
    """A constrained request waits (unscheduled) while its grammar compiles; others keep decoding."""
    compiler = llm.engine.guided.compiler
    backend = compiler.backend("xgrammar")
    release = threading.Event()
    real = type(backend).compile

    def slow_compile(self, spec):
        release.wait(30)
        return real(self, spec)

    type(backend).compile = slow_compile
    try:
        slow = _params(dict(regex=r"slow[0-9]{3}"), "xgrammar", temperature=0)
        llm.engine.add_request("slow", llm.tokenizer.encode(PROMPT), slow)
        llm.processor.add("slow", PROMPT, llm.tokenizer.encode(PROMPT), slow)
        free = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        llm.engine.add_request("free", llm.tokenizer.encode(PROMPT), free)
        llm.processor.add("free", PROMPT, llm.tokenizer.encode(PROMPT), free)
        done = {}
        for _ in range(10):
            outs, _ = llm.processor.process(llm.engine.step())
            done.update({o.request_id: o for o in outs if o.finished})
            if "free" in done:
                break
        assert "free" in done and "slow" not in done
        assert llm.engine.stats().num_waiting == 1  # the constrained one, still compiling
    finally:
        type(backend).compile = real
        release.set()
    while llm.engine.has_unfinished():
        outs, _ = llm.processor.process(llm.engine.step())
        done.update({o.request_id: o for o in outs if o.finished})
    assert re.fullmatch(r"slow[0-9]{3}", done["slow"].outputs[0].text)


@pytest.mark.parametrize("fields,param,match", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "structured_outputs.json", "nope"),
    (dict(regex="(unclosed"), "structured_outputs.regex", "invalid"),
    (dict(grammar='root ::= "a" |'), "structured_outputs.grammar", "invalid"),
    (dict(choice=[]), "structured_outputs.choice", "non-empty"),
])
def test_invalid_specs_raise_naming_the_field(llm, fields, param, match):
    with pytest.raises(GuidedSpecError, match=match) as info:
        llm.generate(PROMPT, _params(fields))
    assert info.value.param == param
    assert not llm.engine.has_unfinished()
    assert llm.generate(PROMPT, SamplingParams(max_tokens=3))[0].outputs[0].text is not None  # still serving


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_jump_forward_saves_forward_passes(backend):
    fields = dict(json=FIXED, disable_any_whitespace=True, backend=backend)
    steps = {}
    for jf in (False, True):
        llm = LLM(max_num_seqs=8, max_model_len=512, jump_forward=jf, dtype="float32")
        steps0 = llm.stats().steps
        out = llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(**fields),
                                                  temperature=0, max_tokens=150))[0].outputs[0]
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), FIXED)
        steps[jf] = llm.stats().steps - steps0
    assert steps[True] <= 0.7 * steps[False], steps  # at least 30% fewer forward passes


def test_jump_forward_per_request_switch_and_logprobs(llm):
    fields = dict(json=FIXED, disable_any_whitespace=True)
    runs = {}
    for name, so, lp in (("on", StructuredOutputsParams(**fields), None),
                         ("off", StructuredOutputsParams(jump_forward=False, **fields), None),
                         ("logprobs", StructuredOutputsParams(**fields), 0)):
        steps0 = llm.stats().steps
        out = llm.generate(PROMPT, SamplingParams(structured_outputs=so, temperature=0, max_tokens=150,
                                                  logprobs=lp))[0].outputs[0]
        jsonschema.validate(json.loads(out.text), FIXED)
        runs[name] = (out, llm.stats().steps - steps0)
    assert runs["on"][1] < runs["off"][1]
    out, steps = runs["logprobs"]
    assert len(out.logprobs) == len(out.token_ids) == steps  # with logprobs every token is sampled, none forced
