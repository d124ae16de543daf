"""The guided-decoding contract through both real backends, without the engine.

Matchers are driven by a seeded random walk over the tokens their bitmask allows, on the
bundled model's tokenizer (byte-level BPE, 4096 tokens): whatever the walk picks, the
decoded text must satisfy the spec once the matcher terminates.
"""
import json
import random
import re

import numpy as np
import pytest
import torch

from tokenmill.guided import GuidedCompiler, GuidedSpec, GuidedSpecError, StructuredOutputsParams, VocabInfo
from tokenmill.guided.manager import backend_classes, choose_backend
from tokenmill.ops.reference import apply_token_bitmask

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def vocab():
    from tokenmill.default_model import resolve_model
    from tokenmill.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(None))
    return VocabInfo(tok, 4096, [tok.eos_token_id])


@pytest.fixture(scope="module")
def compiler(vocab):
    c = GuidedCompiler(vocab)
    yield c
    c.close()


def allowed_ids(bitmask_row: np.ndarray, vocab_size: int) -> list[int]:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def walk(matcher, vocab, seed=0, max_steps=300, jump=False):
    """Pick allowed tokens at random (EOS as soon as it is allowed) until the matcher terminates."""
    rng = random.Random(seed)
    eos = vocab.eos_token_ids[0]
    bm = np.zeros((1, vocab.bitmask_width), dtype=np.int32)
    out: list[int] = []
    text_forced = ""
    for _ in range(max_steps):
        if matcher.is_terminated():
            break
        if jump:
            forced = matcher.forced_continuation()
            if forced:
                ids = vocab.tokenizer.encode(forced, add_special_tokens=False)
                assert all(matcher.accept_token(t) for t in ids), f"forced text {forced!r} was not accepted"
                out += ids
                text_forced += forced
                continue
        bm[:] = 0
        matcher.fill_bitmask(bm, 0)
        allowed = allowed_ids(bm[0], vocab.vocab_size)
        assert allowed, "a matcher that has not terminated must allow some token"
        tok = eos if eos in allowed else rng.choice(allowed)
        assert matcher.accept_token(tok)
        out.append(tok)
    assert matcher.is_terminated(), f"no termination after {max_steps} tokens: {vocab.tokenizer.decode(out)!r}"
    assert out[-1] == eos
    return vocab.tokenizer.decode(out[:-1]), text_forced


SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "name": {"type": "string", "maxLength": 6}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                         "maxItems": 3}},
    "required": ["color", "ok", "name", "tags"], "additionalProperties": False}

CASES = {
    # strict=False: xgrammar 0.2's JSON strings admit raw control characters, which a random walk finds
    "json": (GuidedSpec.json_schema(SCHEMA, any_whitespace=False),
             lambda text: jsonschema.validate(json.loads(text, strict=False), SCHEMA)),
    "regex": (GuidedSpec("regex", r"(ab|c)[0-9]{2,4}-[xyz]"),
              lambda text: re.fullmatch(r"(ab|c)[0-9]{2,4}-[xyz]", text) or pytest.fail(text)),
    "choice": (GuidedSpec.choice(["yes", "no", "maybe not"]),
               lambda text: text in ("yes", "no", "maybe not") or pytest.fail(text)),
}


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("jump", [False, True])
def test_random_walks_satisfy_the_spec(compiler, vocab, backend, case, jump):
    spec, check = CASES[case]
    grammar = compiler.compile(spec, backend)
    assert grammar.backend == backend
    for seed in range(4):
        text, forced = walk(grammar.matcher(), vocab, seed, jump=jump)
        check(text)
        if jump and case == "json":
            assert re.match(r'{"color": ?"', forced), forced  # the first key is forced text


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
def test_json_object_accepts_json_and_rejects_garbage(compiler, vocab, backend):
    tok = vocab.tokenizer
    m = compiler.compile(GuidedSpec("json_object"), backend).matcher()
    assert not m.accept_token(tok.encode("hello", add_special_tokens=False)[0])
    text = '{"a": [1, 2], "b": {"c": null}}' if backend == "xgrammar" else '{"a": 1.5, "b": "x", "c": null}'
    for t in tok.encode(text, add_special_tokens=False):
        assert m.accept_token(t)
    assert m.accept_token(vocab.eos_token_ids[0]) and m.is_terminated()


def test_grammar_and_structural_tag_through_xgrammar(compiler, vocab):
    ebnf = 'root ::= "x" digit digit "!"\ndigit ::= [0-9]'
    text, _ = walk(compiler.compile(GuidedSpec("grammar", ebnf)).matcher(), vocab, seed=3)
    assert re.fullmatch(r"x[0-9]{2}!", text), text
    lark = 'start: "v" NUM\nNUM: /[0-9]{1,3}/'
    text, _ = walk(compiler.compile(GuidedSpec("grammar", lark)).matcher(), vocab, seed=1)
    assert re.fullmatch(r"v[0-9]{1,3}", text), text
    params = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"]}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<tool_call>",
                                                 "content": {"type": "json_schema", "json_schema": params},
                                                 "end": "</tool_call>"}}
    text, forced = walk(compiler.compile(GuidedSpec.structural_tag(tag)).matcher(), vocab, seed=2, jump=True)
    m = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.S)
    assert m and json.loads(m.group(1))["city"] in ("Oslo", "Rome"), text
    assert forced.startswith("<tool_call>")
    legacy = {"structures": [{"begin": "<f>", "schema": params, "end": "</f>"}], "triggers": ["<f>"]}
    compiler.compile(GuidedSpec.structural_tag(legacy))  # vLLM's older format compiles too


def test_outlines_refuses_grammars_and_auto_falls_back(compiler):
    classes = backend_classes()
    with pytest.raises(GuidedSpecError, match="outlines backend does not support grammar"):
        choose_backend(GuidedSpec("grammar", 'root ::= "a"'), "outlines", classes)
    assert choose_backend(GuidedSpec("grammar", 'root ::= "a"'), "auto", classes) == "xgrammar"
    # xgrammar has no Unicode classes or inline flags; outlines-core does: auto falls back
    assert choose_backend(GuidedSpec("regex", r"\p{L}+"), "auto", classes) == "outlines"
    assert choose_backend(GuidedSpec("regex", r"(?i)yes"), "auto", classes) == "outlines"
    assert choose_backend(GuidedSpec("regex", r"[a-z]+"), "auto", classes) == "xgrammar"
    assert compiler.compile(GuidedSpec("regex", r"(?i)yes")).backend == "outlines"


#: A schema with no free strings: every whitespace in its output is between tokens.
NO_STRINGS = {"type": "object", "properties": {"s": {"enum": ["on", "off"]}, "n": {"type": "integer"},
                                               "b": {"type": "boolean"}}, "required": ["s", "n", "b"]}


@pytest.mark.parametrize("spec,param,match", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "structured_outputs.json", "nope"),
    (dict(json="{not json"), "structured_outputs.json", "not valid JSON"),
    (dict(regex="(unclosed"), "structured_outputs.regex", "invalid"),
    (dict(grammar='root ::= "a" |'), "structured_outputs.grammar", "invalid"),
    (dict(choice=[]), "structured_outputs.choice", "non-empty"),
    (dict(structural_tag={"type": "structural_tag", "format": {"type": "bogus"}}),
     "structured_outputs.structural_tag", "invalid"),
    (dict(json={"type": "object"}, regex="a"), "structured_outputs", "exactly one"),
    (dict(regex="a", backend="llguidance"), "structured_outputs.backend", "must be one of"),
    (dict(regex="a+", whitespace_pattern=" "), "structured_outputs.whitespace_pattern", "only to json"),
    (dict(json=NO_STRINGS, whitespace_pattern="x" * 300), "structured_outputs.whitespace_pattern", "at most 256"),
    (dict(json=NO_STRINGS, whitespace_pattern="(", backend="outlines"), "structured_outputs.whitespace_pattern",
     "invalid"),
    (dict(json=NO_STRINGS, whitespace_pattern=" ", disable_any_whitespace=True),
     "structured_outputs.whitespace_pattern", "contradict"),
    (dict(choice=["a"], disable_additional_properties=True), "structured_outputs.disable_additional_properties",
     "only to json"),
    (dict(regex="a", disable_fallback="yes"), "structured_outputs.disable_fallback", "boolean"),
])
def test_invalid_specs_name_the_parameter(spec, param, match):
    with pytest.raises(GuidedSpecError, match=match) as info:
        p = StructuredOutputsParams(**spec)
        choose_backend(p.spec, p.backend or "auto", backend_classes())
    assert info.value.param == param


def test_compile_cache_and_rollback(compiler, vocab):
    spec = GuidedSpec("regex", r"cache[0-9]+")
    before = compiler.num_compiles
    a = compiler.compile(spec, "xgrammar")
    hits = compiler.num_cache_hits
    assert compiler.compile(spec, "xgrammar") is a and compiler.num_cache_hits == hits + 1
    assert compiler.num_compiles == before + 1
    for backend in ("xgrammar", "outlines"):
        m = compiler.compile(spec, backend).matcher()
        ids = vocab.tokenizer.encode("cache12", add_special_tokens=False)
        assert all(m.accept_token(t) for t in ids)
        m.rollback(len(ids))
        assert not m.accept_token(vocab.tokenizer.encode("9", add_special_tokens=False)[0])
        assert m.accept_token(ids[0])
        child = m.fork()
        assert all(child.accept_token(t) for t in ids[1:])
        assert not m.is_terminated() and m.accept_token(ids[1])  # the fork moved alone


def test_reference_bitmask_op_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=gen)
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    got = apply_token_bitmask(logits, bits)
    for r in range(3):
        for t in range(70):
            on = (int(bits[r, t // 32]) >> (t % 32)) & 1
            assert (got[r, t] == logits[r, t]) if on else got[r, t] == float("-inf")
    narrow = apply_token_bitmask(logits, bits[:, :1])  # tokens past the mask's last word: never allowed
    assert torch.isinf(narrow[:, 32:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_op_rows_and_the_cpu_plugins_kernel(dtype):
    from tokenmill_cpu.bitmask import apply_token_bitmask as cpu_apply

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=gen).to(dtype)
    bits = torch.randint(-(2**31), 2**31 - 1, (4, 4), generator=gen, dtype=torch.int64).to(torch.int32)
    before = logits.clone()
    full = apply_token_bitmask(logits, bits)
    for op in (apply_token_bitmask, cpu_apply):
        got = op(logits, bits, [0, 2])
        assert torch.equal(logits, before)  # functional
        assert torch.equal(got[[0, 2]], full[[0, 2]]) and torch.equal(got[[1, 3]], logits[[1, 3]])
        assert torch.equal(op(logits, bits), full)
        narrow = op(logits, bits[:, :2].contiguous(), [3])  # past the mask's last word: never allowed
        assert torch.isinf(narrow[3, 64:]).all() and torch.equal(narrow[:3], logits[:3])


def test_runtime_mask_fills_constrained_rows_in_one_batch(compiler, vocab, monkeypatch):
    from tokenmill.guided.runtime import GuidedRuntime, GuidedSeq
    from tokenmill.guided.xgrammar_backend import XGrammarMatcher

    calls = []
    real = XGrammarMatcher.fill_bitmasks.__func__
    monkeypatch.setattr(XGrammarMatcher, "fill_bitmasks",
                        classmethod(lambda cls, ms, bm, rows: (calls.append(list(rows)), real(cls, ms, bm, rows))))
    rt = GuidedRuntime(compiler)
    digits = compiler.compile(GuidedSpec("regex", r"[0-9]+"), "xgrammar")
    letters = compiler.compile(GuidedSpec("regex", r"[a-z]+"), "xgrammar")
    a, b = GuidedSeq(digits.matcher(), True), GuidedSeq(letters.matcher(), True)
    logits = torch.zeros(5, vocab.vocab_size)
    seen = []
    out = rt.mask(logits, [0, 1, 2, 4], [a, a, b, b], lambda lg, bm, idx: (seen.append(idx), apply_token_bitmask(lg, bm, idx))[1])
    assert calls == [[0, 2]] and seen == [[0, 1, 2, 4]]  # one fill for the batch; a forked row copies its parent's
    tok = vocab.tokenizer
    allowed = [set(torch.isfinite(out[r]).nonzero().flatten().tolist()) for r in range(5)]
    assert allowed[0] == allowed[1] and allowed[2] == allowed[4] and len(allowed[3]) == vocab.vocab_size
    assert all(tok.decode([t]).isdigit() for t in allowed[0]) and all(tok.decode([t]).isalpha() for t in allowed[2])


def test_whitespace_pattern_through_outlines_and_refused_by_xgrammar(compiler, vocab):
    # exactly one newline wherever the JSON may hold whitespace: outlines-core's default ("[ ]?") never writes one
    so = StructuredOutputsParams(json=NO_STRINGS, whitespace_pattern=r"\n")
    classes = backend_classes()
    assert choose_backend(so.spec, "auto", classes) == "outlines"  # xgrammar cannot: auto falls back
    grammar = compiler.compile(so.spec)
    assert grammar.backend == "outlines"
    for seed in range(3):
        text, _ = walk(grammar.matcher(), vocab, seed)
        value = json.loads(text)
        jsonschema.validate(value, NO_STRINGS)
        assert " " not in text and text.replace("\n", "") == json.dumps(value, separators=(",", ":")), text
        assert text.count("\n") == 12, text  # after "{", around each ":", after each ",", before "}"
    with pytest.raises(GuidedSpecError, match="xgrammar backend does not support structured_outputs.whitespace_") as e:
        choose_backend(so.spec, "xgrammar", classes)
    assert e.value.param == "structured_outputs.whitespace_pattern"
    with pytest.raises(GuidedSpecError, match="disable_fallback is set, so auto does not fall back to outlines") as e:
        compiler.compile(so.spec, "auto", fallback=False)
    assert e.value.param == "structured_outputs.whitespace_pattern"
    # the older alias names itself
    alias = StructuredOutputsParams(json=NO_STRINGS, whitespace_pattern=" ", param="guided_json")
    with pytest.raises(GuidedSpecError) as e:
        choose_backend(alias.spec, "xgrammar", classes)
    assert e.value.param == "guided_whitespace_pattern"
    # json_object takes the pattern too
    obj = StructuredOutputsParams(json_object=True, whitespace_pattern=r"\t")
    m = compiler.compile(obj.spec, "outlines").matcher()
    assert all(m.accept_token(t) for t in vocab.tokenizer.encode('{\t"a"\t:\t1\t}', add_special_tokens=False))
    m = compiler.compile(obj.spec, "outlines").matcher()
    assert not all(m.accept_token(t) for t in vocab.tokenizer.encode('{ "a": 1}', add_special_tokens=False))


def test_disable_fallback_keeps_auto_on_xgrammar(compiler):
    classes = backend_classes()
    spec = StructuredOutputsParams(regex=r"\p{L}+").spec  # xgrammar cannot; outlines-core can
    assert choose_backend(spec, "auto", classes) == "outlines"
    with pytest.raises(GuidedSpecError, match=r"invalid structured_outputs\.regex.*disable_fallback is set") as e:
        choose_backend(spec, "auto", classes, fallback=False)
    assert e.value.param == "structured_outputs.regex"
    with pytest.raises(GuidedSpecError, match="disable_fallback"):
        compiler.compile(spec, "auto", fallback=False)
    assert compiler.compile(spec, "auto").backend == "outlines"  # the failed no-fallback compile is not cached for it
    assert choose_backend(spec, "outlines", classes, fallback=False) == "outlines"  # a named backend never falls back
    assert choose_backend(StructuredOutputsParams(regex="[a-z]+").spec, "auto", classes, fallback=False) == "xgrammar"


def test_disable_additional_properties_closes_objects_on_both_backends(compiler, vocab):
    schema = {"type": "object", "properties": {"o": {"type": "object"}}, "required": ["o"]}
    tok = vocab.tokenizer

    def accepts(spec, backend, text):
        m = compiler.compile(spec, backend).matcher()
        return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False)) \
            and m.accept_token(vocab.eos_token_ids[0])

    open_ = StructuredOutputsParams(json=schema).spec
    closed = StructuredOutputsParams(json=schema, disable_additional_properties=True).spec
    assert closed.key != open_.key
    # both libraries let an object schema that lists no properties hold any (xgrammar's strict mode closes
    # only objects that list some); the flag closes it
    for backend in ("xgrammar", "outlines"):
        assert accepts(open_, backend, '{"o": {"x": 1}}') and accepts(open_, backend, '{"o": {}}')
        assert not accepts(closed, backend, '{"o": {"x": 1}}') and accepts(closed, backend, '{"o": {}}')
    # an object that says what else it allows keeps it
    free = {"type": "object", "properties": {"o": {"type": "object", "additionalProperties": {"type": "integer"}}},
            "required": ["o"]}
    kept = StructuredOutputsParams(json=free, disable_additional_properties=True).spec
    assert accepts(kept, "xgrammar", '{"o": {"x": 1}}') and not accepts(kept, "xgrammar", '{"o": {"x": "a"}}')
