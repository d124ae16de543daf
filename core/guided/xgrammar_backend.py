"""The xgrammar backend (the default): every spec kind, character-level jump-forward."""
from __future__ import annotations

import json
import os
import re

from tokenmill.guided.interface import (CompiledGrammar, GuidedBackend, GuidedMatcher, GuidedSpec,
                                        GuidedSpecError, schema_nodes)


#: "Any whitespace" in JSON means up to this many whitespace characters in a row (pretty-printing fits;
#: a model that would pad forever - small ones do - cannot).
MAX_WHITESPACE_RUN = 16
#: Threads xgrammar may use to fill one batch's bitmask rows.
BATCH_FILL_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


def _grammar_text_is_ebnf(text: str) -> bool:
    return "::=" in text


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _structural_tag_arg(tag: dict):
    """xgrammar's structural-tag input: the current format as is; vLLM's legacy one converted."""
    if "format" in tag:
        return json.dumps(tag)
    if "structures" in tag:
        import xgrammar as xgr

        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return items, list(tag.get("triggers", []))
    raise ValueError('a structural tag needs "format" (xgrammar) or "structures" and "triggers" (vLLM)')


def _grammar(spec: GuidedSpec):
    """The xgrammar Grammar of ``spec`` (parsing only: no tokenizer needed). Raises ValueError/RuntimeError."""
    import xgrammar as xgr

    kind = spec.kind
    ws = MAX_WHITESPACE_RUN if spec.any_whitespace else None
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec.value, any_whitespace=spec.any_whitespace, strict_mode=True,
                                            max_whitespace_cnt=ws)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=spec.any_whitespace,
                                            max_whitespace_cnt=ws)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec.value)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(_choice_ebnf(spec.loads()))
    if kind == "grammar":
        if _grammar_text_is_ebnf(spec.value):
            return xgr.Grammar.from_ebnf(spec.value)
        return xgr.Grammar.from_lark(spec.value)
    arg = _structural_tag_arg(spec.loads())
    return xgr.Grammar.from_structural_tag(*arg) if isinstance(arg, tuple) else xgr.Grammar.from_structural_tag(arg)


class XGrammarMatcher(GuidedMatcher):
    __slots__ = ("_m",)

    def __init__(self, matcher):
        self._m = matcher

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def forced_continuation(self) -> str:
        return self._m.find_jump_forward_string()

    def fork(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self._m.fork())

    @classmethod
    def fill_bitmasks(cls, matchers, bitmask, rows) -> None:
        if len(matchers) == 1:
            matchers[0].fill_bitmask(bitmask, rows[0])
            return
        _batch_filler().batch_fill_next_token_bitmask([m._m for m in matchers], bitmask, list(rows))


_BATCH = None


def _batch_filler():
    """One ``xgrammar.BatchGrammarMatcher`` per process: it fills a batch's rows in C++ (on a few threads)."""
    global _BATCH
    if _BATCH is None:
        import xgrammar as xgr

        _BATCH = xgr.BatchGrammarMatcher(max_threads=BATCH_FILL_THREADS)
    return _BATCH


class XGrammarCompiled(CompiledGrammar):
    backend = "xgrammar"

    def __init__(self, compiled, stop_token_ids: list[int]):
        self._compiled = compiled
        self._stop = stop_token_ids

    def matcher(self) -> XGrammarMatcher:
        import xgrammar as xgr

        return XGrammarMatcher(xgr.GrammarMatcher(self._compiled, override_stop_tokens=self._stop or None))


class XGrammarBackend(GuidedBackend):
    """Compiles with ``xgrammar.GrammarCompiler`` (its own cache off: the engine caches by spec)."""

    name = "xgrammar"
    kinds = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")

    def __init__(self, vocab):
        super().__init__(vocab)
        import xgrammar as xgr

        self._info = xgr.TokenizerInfo.from_huggingface(vocab.tokenizer, vocab_size=vocab.vocab_size,
                                                        stop_token_ids=vocab.eos_token_ids or None)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)

    @classmethod
    def available(cls) -> str | None:
        try:
            import xgrammar  # noqa: F401
        except ImportError as exc:
            return f"xgrammar is not installed ({exc})"
        return None

    @classmethod
    def validate(cls, spec: GuidedSpec) -> None:
        super().validate(spec)
        if spec.whitespace_pattern is not None:
            # xgrammar's JSON grammar knows only "any whitespace" (bounded) or compact separators
            raise GuidedSpecError(f"the xgrammar backend does not support {spec.whitespace_param} (outlines does; "
                                  f"xgrammar offers disable_any_whitespace)", spec.whitespace_param)
        if spec.kind == "json" and any("pattern" in n and ("minLength" in n or "maxLength" in n)
                                       for n in schema_nodes(spec.loads())):
            # xgrammar 0.2 drops the length bounds of a string with a pattern (with a warning)
            raise GuidedSpecError(f"the xgrammar backend cannot enforce minLength/maxLength together with pattern "
                                  f"in {spec.param}; put the length in the pattern", spec.param)
        try:
            _grammar(spec)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/its own errors with the reason
            raise GuidedSpecError(f"invalid {spec.param}: {_reason(exc)}", spec.param) from None

    def compile(self, spec: GuidedSpec) -> XGrammarCompiled:
        self.validate(spec)
        try:
            compiled = self._compiler.compile_grammar(_grammar(spec))
        except Exception as exc:
            raise GuidedSpecError(f"invalid {spec.param}: {_reason(exc)}", spec.param) from None
        return XGrammarCompiled(compiled, self.vocab.eos_token_ids)


def _reason(exc: BaseException) -> str:
    """The first line of xgrammar's message, without its C++ log prefix (``[hh:mm:ss] file.cc:12: ``)."""
    text = str(exc).strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text[0]) if text else type(exc).__name__
