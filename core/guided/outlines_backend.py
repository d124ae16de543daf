"""The outlines backend (outlines-core): JSON schema, json_object, regex and choice as a token DFA.

outlines-core has no grammar engine, so ``grammar`` and ``structural_tag`` are refused (``auto``
sends them to xgrammar). JSON-schema keywords its regex builder would silently drop are refused
too, except bounded integers, which are given to it as the equivalent enum. Its index is token-level, so the forced continuation is found by
walking states whose allowed tokens all share one prefix that is itself a token.
"""
from __future__ import annotations

import functools
import json

from tokenmill.guided.interface import (MAX_ROLLBACK, CompiledGrammar, GuidedBackend, GuidedMatcher, GuidedSpec,
                                        GuidedSpecError, schema_nodes)

_META = set("\\.^$|?*+()[]{}-&~#")
#: A state with more allowed tokens than this is not forcing anything worth a walk.
_FORCED_MAX_CANDIDATES = 256
#: Forced tokens walked per call (the matcher rolls them back, so below MAX_ROLLBACK).
_FORCED_MAX_TOKENS = MAX_ROLLBACK // 2


#: JSON-schema keywords outlines-core's regex builder ignores: refused rather than silently not enforced.
_UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
               "minProperties", "maxProperties", "patternProperties", "propertyNames", "contains", "not", "if",
               "dependentRequired", "dependentSchemas")


def unenforced_keywords(schema) -> set[str]:
    """The keywords of ``schema`` (walked through its subschemas) that outlines-core would not enforce."""
    found: set[str] = set()
    for node in schema_nodes(schema):
        found.update(k for k in _UNENFORCED if k in node)
        if "pattern" in node and ("minLength" in node or "maxLength" in node):
            found.add("pattern with minLength/maxLength")  # the length wins, the pattern is dropped
    return found


#: Widest integer range turned into an enum (outlines-core indexes the alternation quickly up to here).
_MAX_RANGE_AS_ENUM = 1000


def with_integer_ranges(schema):
    """``schema`` (a copy) with every bounded integer (``minimum`` and ``maximum``, at most
    ``_MAX_RANGE_AS_ENUM`` values) written as the equivalent enum, which outlines-core enforces."""
    schema = json.loads(json.dumps(schema))
    for node in schema_nodes(schema):
        lo, hi = node.get("minimum"), node.get("maximum")
        if node.get("type") == "integer" and isinstance(lo, int) and isinstance(hi, int) \
                and not isinstance(lo, bool) and not isinstance(hi, bool) and 0 <= hi - lo <= _MAX_RANGE_AS_ENUM \
                and not {"exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const"} & set(node):
            for k in ("type", "minimum", "maximum"):
                del node[k]
            node["enum"] = list(range(lo, hi + 1))
    return schema


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _META else c for c in text)


def spec_regex(spec: GuidedSpec) -> str:
    """The regex outlines-core indexes for ``spec``. Raises ValueError for bad schemas."""
    from outlines_core.json_schema import build_regex_from_schema

    ws = spec.whitespace_pattern if spec.any_whitespace else ""
    if spec.kind == "json":
        value = json.dumps(with_integer_ranges(spec.loads()))
    elif spec.kind == "json_object":
        # outlines-core's regex for a free object nests two levels and takes ~20 s to index over
        # a 4k vocabulary; an object of scalar values indexes in well under a second
        value = '{"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}'
    else:
        value = None
    if value is not None:
        return build_regex_from_schema(value, ws) if ws is not None else build_regex_from_schema(value)
    if spec.kind == "regex":
        return spec.value
    if spec.kind == "choice":
        return "(" + "|".join(_escape(c) for c in spec.loads()) + ")"
    raise GuidedSpecError(f"the outlines backend does not support {spec.kind}", spec.param)


@functools.lru_cache(maxsize=1)
def _byte_vocabulary():
    """Every single byte as a token: enough to check that a regex builds a DFA, without a tokenizer."""
    import outlines_core as oc

    return oc.Vocabulary(256, {bytes([b]): [b] for b in range(256)})


class OutlinesMatcher(GuidedMatcher):
    def __init__(self, compiled: "OutlinesCompiled", guide=None, history=None):
        import outlines_core as oc

        self._c = compiled
        self._g = guide if guide is not None else oc.Guide(compiled.index, max_rollback=MAX_ROLLBACK)
        self._history: list[int] = history if history is not None else []

    def fill_bitmask(self, bitmask, row: int) -> None:
        line = bitmask[row]
        self._g.write_mask_into(line.ctypes.data, line.size, 4)

    def accept_token(self, token_id: int) -> bool:
        if self.is_terminated():
            return False
        if token_id in self._c.eos:
            # outlines-core lists EOS as allowed in a final state but has no transition for it
            if not self._g.is_finished():
                return False
        elif self._g.accepts_tokens([token_id]):
            self._g.advance(token_id, return_tokens=False)
        else:
            return False
        self._history.append(token_id)
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        undone = self._history[-num_tokens:]
        del self._history[-num_tokens:]
        states = sum(1 for t in undone if t not in self._c.eos)
        if states:
            self._g.rollback_state(states)

    def is_terminated(self) -> bool:
        return bool(self._history) and self._history[-1] in self._c.eos

    def forced_continuation(self) -> str:
        if self.is_terminated():
            return ""
        token_bytes, by_bytes, eos = self._c.token_bytes, self._c.by_bytes, self._c.eos
        forced = b""
        walked = 0
        while walked < _FORCED_MAX_TOKENS:
            allowed = self._g.get_tokens()
            if not allowed or len(allowed) > _FORCED_MAX_CANDIDATES or any(t in eos for t in allowed):
                break
            texts = [token_bytes[t] for t in allowed if token_bytes[t]]
            if len(texts) != len(allowed):
                break
            prefix = _common_prefix(texts)
            token = by_bytes.get(prefix)
            if not prefix or token is None or token not in allowed:
                break
            self._g.advance(token, return_tokens=False)
            walked += 1
            forced += prefix
        if walked:
            self._g.rollback_state(walked)
        return forced.decode("utf-8", errors="ignore") if forced else ""

    def fork(self) -> "OutlinesMatcher":
        # a deep copy of a Guide loses its rollback depth (outlines-core 0.2): replay instead
        twin = OutlinesMatcher(self._c)
        for t in self._history:
            if t not in self._c.eos:
                twin._g.advance(t, return_tokens=False)
        twin._history = list(self._history)
        return twin


def _common_prefix(items: list[bytes]) -> bytes:
    lo, hi = min(items), max(items)
    n = 0
    while n < len(lo) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


class OutlinesCompiled(CompiledGrammar):
    backend = "outlines"

    def __init__(self, index, token_bytes, by_bytes, eos):
        self.index = index
        self.token_bytes = token_bytes
        self.by_bytes = by_bytes
        self.eos = eos

    def matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self)


class OutlinesBackend(GuidedBackend):
    """Indexes the spec's regex over the model's vocabulary with ``outlines_core.Index``."""

    name = "outlines"
    kinds = ("json", "json_object", "regex", "choice")

    def __init__(self, vocab):
        super().__init__(vocab)
        import outlines_core as oc

        self._eos = frozenset(vocab.eos_token_ids)
        token_bytes = vocab.token_bytes()
        groups: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b and i not in self._eos:
                groups.setdefault(b, []).append(i)
        self._token_bytes = token_bytes
        self._by_bytes = {b: ids[0] for b, ids in groups.items()}
        self._vocabulary = oc.Vocabulary(vocab.eos_token_ids[0], groups)

    @classmethod
    def available(cls) -> str | None:
        try:
            import outlines_core  # noqa: F401
        except ImportError as exc:
            return f"outlines-core is not installed ({exc})"
        return None

    @classmethod
    def validate(cls, spec: GuidedSpec) -> None:
        super().validate(spec)
        import outlines_core as oc

        if spec.kind == "json":
            missing = unenforced_keywords(with_integer_ranges(spec.loads()))
            if missing:
                raise GuidedSpecError(f"the outlines backend cannot enforce {', '.join(sorted(missing))} in "
                                      f"{spec.param} (xgrammar can)", spec.param)
        if spec.whitespace_pattern is not None:
            try:
                oc.Index(f"({spec.whitespace_pattern})", _byte_vocabulary())
            except Exception as exc:
                raise GuidedSpecError(f"invalid {spec.whitespace_param}: {exc}", spec.whitespace_param) from None
        try:
            oc.Index(spec_regex(spec), _byte_vocabulary())
        except GuidedSpecError:
            raise
        except Exception as exc:
            raise GuidedSpecError(f"invalid {spec.param}: {exc}", spec.param) from None

    def compile(self, spec: GuidedSpec) -> OutlinesCompiled:
        import outlines_core as oc

        try:  # validated by the compiler already (building the index on the byte vocabulary is not cheap)
            index = oc.Index(spec_regex(spec), self._vocabulary)
        except Exception as exc:
            raise GuidedSpecError(f"invalid {spec.param}: {exc}", spec.param) from None
        return OutlinesCompiled(index, self._token_bytes, self._by_bytes, self._eos)
