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
    "name": {"type": "string", "maxLength": 8}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
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
    fields = {"backend": backend, **fields}
    return SamplingParams(structured_outputs=StructuredOutputsParams(**fields), **kw)


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
    # neither library enforces both (xgrammar drops the length, outlines-core the pattern): refused
    (dict(json={"type": "string", "pattern": "^a+$", "maxLength": 3}), "structured_outputs.json", "cannot enforce"),
    # outlines-core would drop an open integer bound (a closed range it gets as an enum)
    (dict(json={"type": "integer", "minimum": 5}, backend="outlines"), "structured_outputs.json", "cannot enforce minimum"),
    # xgrammar cannot compile it and disable_fallback keeps auto from going to outlines
    (dict(regex=r"\p{L}+", disable_fallback=True), "structured_outputs.regex", "disable_fallback is set"),
    (dict(json=FIXED, whitespace_pattern=" ", backend="xgrammar"), "structured_outputs.whitespace_pattern",
     "xgrammar backend does not support"),
])
def test_invalid_specs_raise_naming_the_field(llm, fields, param, match):
    with pytest.raises(GuidedSpecError, match=match) as info:
        llm.generate(PROMPT, _params(fields))
    assert info.value.param == param
    assert not llm.engine.has_unfinished()
    assert llm.generate(PROMPT, SamplingParams(max_tokens=3))[0].outputs[0].text is not None  # still serving


def test_whitespace_pattern_and_closed_objects_shape_the_output(llm):
    # every whitespace exactly one newline (auto falls back to outlines: xgrammar cannot), greedy and n=2
    p = [_params(dict(json=FIXED, whitespace_pattern=r"\n"), temperature=0),
         _params(dict(json=FIXED, whitespace_pattern=r"\n"), temperature=1.0, n=2, seed=5)]
    outs = llm.generate([PROMPT, PROMPT], p)
    for c in [c for o in outs for c in o.outputs]:
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        jsonschema.validate(value, FIXED)
        assert " " not in c.text and c.text.replace("\n", "") == json.dumps(value, separators=(",", ":")), c.text
    # an object schema listing no properties holds nothing with disable_additional_properties, on both backends
    schema = {"type": "object", "properties": {"meta": {"type": "object"}, "ok": {"type": "boolean"}},
              "required": ["meta", "ok"]}
    for backend in ("xgrammar", "outlines"):
        fields = dict(json=schema, disable_any_whitespace=True, disable_additional_properties=True)
        outs = llm.generate(PROMPT, _params(fields, backend, temperature=1.0, n=3, seed=11))
        for c in outs[0].outputs:
            assert c.finish_reason == "stop", c.text
            assert json.loads(c.text)["meta"] == {}, c.text
    # disable_fallback changes nothing where xgrammar compiles the spec
    out = llm.generate(PROMPT, _params(dict(regex=REGEX, disable_fallback=True), temperature=0))[0].outputs[0]
    assert re.fullmatch(REGEX, out.text), out.text


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_jump_forward_saves_forward_passes_not_tokens(backend):
    """Forced text is always the canonical tokens: jump-forward only computes them in one pass."""
    fields = dict(json=FIXED, disable_any_whitespace=True, backend=backend)
    runs = {}
    for jf in (False, True):
        llm = LLM(max_num_seqs=8, max_model_len=512, jump_forward=jf, dtype="float32")
        steps0 = llm.stats().steps
        out = llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(**fields),
                                                  temperature=0, max_tokens=150))[0].outputs[0]
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), FIXED)
        runs[jf] = (json.loads(out.text), out.token_ids, llm.stats().steps - steps0)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    assert runs[False][2] == len(runs[False][1])  # off: one forward pass per token
    assert runs[True][2] <= 0.7 * runs[False][2], runs  # on: at least 30% fewer


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
    assert runs["on"][1] < runs["off"][1] == len(runs["off"][0].token_ids)
    assert runs["on"][0].token_ids == runs["off"][0].token_ids == runs["logprobs"][0].token_ids
    out, steps = runs["logprobs"]
    assert len(out.logprobs) == len(out.token_ids) == steps  # with logprobs every token is sampled
    # a forced token is the only one its mask allows: probability 1 under the constraint
    forced = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
    assert sum(1 for x in forced if x == 0.0) >= len(forced) // 2


# -- property tests: generated schemas -----------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_KEYS = st.sampled_from(["id", "name", "kind", "size", "ok", "tags", "x", "level", "mode"])
_LEAVES = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}), st.just({"type": "integer"}),
    st.lists(st.sampled_from(["red", "green", "blue", "a b", "q"]), min_size=1, max_size=3, unique=True)
      .map(lambda xs: {"enum": xs}),
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.integers(1, 6).map(lambda n: {"type": "string", "pattern": f"^[a-z ]{{0,{n}}}$"}),
)


def _object(children):
    return st.dictionaries(_KEYS, children, min_size=1, max_size=4).map(
        lambda props: {"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False})


SCHEMAS = st.recursive(_LEAVES, lambda children: st.one_of(
    _object(children),
    st.tuples(children, st.integers(0, 3)).map(lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}),
), max_leaves=6).filter(lambda s: s.get("type") in ("object", "array"))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(schema=SCHEMAS, backend=st.sampled_from(["xgrammar", "outlines"]), seed=st.integers(0, 1000))
def test_generated_schemas_output_validates(llm, schema, backend, seed):
    """Whatever the schema, what the engine writes under it validates against it."""
    p = _params(dict(json=schema, disable_any_whitespace=True), backend, temperature=1.0, seed=seed, max_tokens=200)
    out = llm.generate(PROMPT, p)[0].outputs[0]
    if out.finish_reason == "length":  # an unbounded integer can run long: a valid prefix then
        assert _accepted(llm, p.structured_outputs, out.token_ids), out.text
    else:
        jsonschema.validate(json.loads(out.text), schema)


def _instances(schema):
    """Instances of a generated schema: hypothesis-jsonschema draws the leaves (its own object
    strategy does not run on this hypothesis), objects and arrays are assembled here."""
    from hypothesis_jsonschema import from_schema

    if schema.get("type") == "object":
        keys = list(schema["properties"])  # in the schema's order, the order both backends write keys in
        return st.fixed_dictionaries({k: _instances(v) for k, v in schema["properties"].items()}).map(
            lambda d: {k: d[k] for k in keys})
    if schema.get("type") == "array":
        return st.lists(_instances(schema["items"]), max_size=schema["maxItems"])
    if schema.get("type") == "string":  # JSON-escapable text only (outlines-core has no \\u escapes)
        return from_schema(schema).filter(lambda x: x.isascii() and x.isprintable())
    return from_schema(schema)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data(), schema=SCHEMAS, backend=st.sampled_from(["xgrammar", "outlines"]))
def test_every_valid_instance_is_accepted(llm, data, schema, backend):
    """The other direction: any instance of the schema, as json.dumps writes it, is accepted
    token by token and ends the grammar."""
    instance = data.draw(_instances(schema))
    jsonschema.validate(instance, schema)
    p = _params(dict(json=schema), backend)
    m = llm.engine.guided.compiler.compile(p.structured_outputs.spec, backend).matcher()
    ids = llm.tokenizer.encode(json.dumps(instance), add_special_tokens=False)
    assert all(m.accept_token(t) for t in ids), json.dumps(instance)
    assert m.accept_token(llm.tokenizer.eos_token_id) and m.is_terminated()


def test_bench_structured_runs(tmp_path):
    import subprocess
    import sys

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "structured", "--dtype", "float32",
                           "--concurrency", "1,2", "--output-len", "8", "--min-requests", "2", "--rounds", "1",
                           "--schemas", "2", "--backends", "xgrammar", "--json-out", str(out), "--png", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["concurrency"] for r in res["mask_cost"]] == [1, 2]
    assert all(0 < r["guided_share"] < 1 for r in res["mask_cost"])
    (jf,) = res["jump_forward"]
    assert jf["same_value"] == 2 and jf["passes_on"] < jf["passes_off"]
    assert all(r["cached_ms"] < r["cold_ms"] for r in res["compile"])
    assert png.stat().st_size > 0
