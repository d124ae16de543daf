"""The guided-decoding contract: specs, backends, compiled grammars and per-sequence matchers.

A **spec** (:class:`GuidedSpec`) says what the output must be: a JSON schema, any JSON object,
a regex, one of a list of choices, a grammar (EBNF/GBNF, or Lark), or an xgrammar structural
tag (the tagged JSON sections tool calling needs). Specs are hashable values: the engine caches
compiled grammars by ``(backend, spec.key)``, so the hundredth request with the same schema
compiles nothing.

A **backend** (:class:`GuidedBackend`, registered through the ``tokenmill_guided_decoding_backends``
hook) is built once per engine with the model's :class:`VocabInfo`. It

- ``validate(spec)`` (a classmethod, no tokenizer needed): raise :class:`GuidedSpecError` if the
  spec is malformed or this backend cannot handle it; cheap enough to run in the API process;
- ``compile(spec) -> CompiledGrammar``: the expensive part, thread-safe, run off the step loop.

A **compiled grammar** makes **matchers**; one matcher follows one sequence (each of ``n``
continuations has its own). A matcher

- ``fill_bitmask(bitmask, row)``: writes the allowed next tokens into row ``row`` of an int32
  numpy array of shape ``[rows, ceil(vocab_size / 32)]`` (bit ``t % 32`` of word ``t // 32`` set
  = token ``t`` allowed; the layout xgrammar and outlines-core share);
- ``accept_token(token_id) -> bool``: advances; False (state unchanged) if the token is not allowed;
- ``rollback(num_tokens)``: undoes the last accepted tokens (at least ``MAX_ROLLBACK`` of them);
- ``is_terminated()``: the grammar has accepted a stop token (the sequence must end);
- ``forced_continuation() -> str``: the text every valid continuation starts with from here
  ("" when the next character is not determined) - what jump-forward appends without sampling;
- ``fork()``: an independent copy in the same state;
- ``fill_bitmasks(matchers, bitmask, rows)`` (a classmethod): the rows of a whole batch at once.

Matchers are plain objects on the engine side: torch-free, called on the hot path directly.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

#: Spec kinds, as vLLM's ``structured_outputs`` names them.
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
#: Tokens a matcher must be able to roll back (jump-forward retokenizes a few at the boundary).
MAX_ROLLBACK = 16
#: Longest ``whitespace_pattern`` accepted (it is compiled into every whitespace of the schema's regex).
MAX_PATTERN = 256


class GuidedSpecError(ValueError):
    """An invalid or unsupported spec. ``param`` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuidedSpec:
    """One constraint. ``value`` by kind:

    - ``json``: the schema as a canonical JSON string (build with :meth:`json_schema`);
    - ``json_object``: ``""`` (any JSON object);
    - ``regex``: the pattern; ``grammar``: the grammar text (``::=`` rules: EBNF/GBNF, else Lark);
    - ``choice``: a JSON array of the allowed strings;
    - ``structural_tag``: xgrammar's structural-tag JSON (``{"type": "structural_tag", "format":
      ...}``) or vLLM's older ``{"structures": [{"begin", "schema", "end"}], "triggers": [...]}``.

    ``any_whitespace``: JSON kinds may put any whitespace between tokens (False: compact
    separators, fewer tokens). ``whitespace_pattern``: for JSON kinds, the regex that every
    whitespace between tokens must match instead (vLLM's field; outlines-core builds it into the
    schema's regex, xgrammar refuses it). ``param`` is where the spec came from, for error messages.
    """

    kind: str
    value: str = ""
    any_whitespace: bool = True
    whitespace_pattern: str | None = None
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GuidedSpecError(f"unknown structured output kind {self.kind!r}; known: {', '.join(KINDS)}",
                                  self.param)
        if not isinstance(self.value, str):
            raise GuidedSpecError(f"{self.kind} must be a string, got {type(self.value).__name__}", self.param)
        if self.whitespace_pattern is not None:
            wp = self.whitespace_param
            if self.kind not in ("json", "json_object"):
                raise GuidedSpecError(f"{wp} applies only to json and json_object constraints, not {self.kind}", wp)
            if not isinstance(self.whitespace_pattern, str) or not 0 < len(self.whitespace_pattern) <= MAX_PATTERN:
                raise GuidedSpecError(f"{wp} must be a non-empty string of at most {MAX_PATTERN} characters", wp)
            if not self.any_whitespace:
                raise GuidedSpecError(f"{wp} and disable_any_whitespace contradict each other; set one", wp)

    @property
    def key(self) -> tuple:
        """The compile-cache key."""
        return self.kind, self.value, self.any_whitespace, self.whitespace_pattern

    @property
    def whitespace_param(self) -> str:
        """The request field ``whitespace_pattern`` came from (vLLM's older alias outside ``structured_outputs``)."""
        return "structured_outputs.whitespace_pattern" if self.param.startswith("structured_outputs") \
            else "guided_whitespace_pattern"

    # -- constructors normalising user input --------------------------------------------------
    @classmethod
    def json_schema(cls, schema: Any, param: str = "structured_outputs.json", close_objects: bool = False,
                    **kw) -> "GuidedSpec":
        """From a schema given as a dict, a JSON string or a pydantic model class. ``close_objects``:
        every object subschema that does not say otherwise gets ``additionalProperties: false``
        (vLLM's ``disable_additional_properties``; see :func:`closed_objects`)."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GuidedSpecError(f"{param} is not valid JSON: {exc}", param) from None
        if not isinstance(schema, (dict, bool)):
            raise GuidedSpecError(f"{param} must be a JSON schema object, got {type(schema).__name__}", param)
        if close_objects:
            schema = closed_objects(schema)
        return cls("json", _canonical(schema), param=param, **kw)

    @classmethod
    def choice(cls, choices: Sequence[str], param: str = "structured_outputs.choice") -> "GuidedSpec":
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
            raise GuidedSpecError(f"{param} must be a non-empty list of strings", param)
        return cls("choice", json.dumps(list(choices)), param=param)

    @classmethod
    def structural_tag(cls, tag: Any, param: str = "structured_outputs.structural_tag") -> "GuidedSpec":
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except ValueError as exc:
                raise GuidedSpecError(f"{param} is not valid JSON: {exc}", param) from None
        if not isinstance(tag, dict):
            raise GuidedSpecError(f"{param} must be a JSON object", param)
        return cls("structural_tag", _canonical(tag), param=param)

    def loads(self) -> Any:
        """``value`` parsed (json, choice, structural_tag)."""
        return json.loads(self.value)


def schema_nodes(schema: Any):
    """Every subschema of a JSON schema (itself first), for backends checking what they can enforce."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        yield node
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "contains"):
            if key in node:
                stack.append(node[key])


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` in which every object subschema without ``additionalProperties`` (or
    ``patternProperties`` / ``unevaluatedProperties``) allows only the properties it lists:
    ``additionalProperties: false``, plus an empty ``properties`` where it lists none (the form
    outlines-core understands). Both libraries already keep an object that lists properties to
    those (xgrammar in strict mode), but let one that lists none hold any."""
    schema = json.loads(json.dumps(schema))
    for node in schema_nodes(schema):
        is_object = node.get("type") == "object" or (isinstance(node.get("type"), list) and "object" in node["type"]) \
            or "properties" in node
        if is_object and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & set(node):
            node.setdefault("properties", {})
            node["additionalProperties"] = False
    return schema


def _canonical(obj: Any) -> str:
    # key order is kept: a schema's property order is the order the output follows
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class VocabInfo:
    """The model's vocabulary as backends need it.

    ``tokenizer`` is the HF (fast) tokenizer; ``vocab_size`` the model's logits width (may exceed
    the tokenizer's: padded rows are never allowed); ``eos_token_ids`` the ids that end a sequence.
    """

    tokenizer: Any
    vocab_size: int
    eos_token_ids: list[int]
    _token_bytes: list[bytes | None] | None = field(default=None, repr=False)

    @property
    def bitmask_width(self) -> int:
        return (self.vocab_size + 31) // 32

    def token_bytes(self) -> list[bytes | None]:
        """Per token id the bytes it decodes to (None: a special token or a padded id)."""
        if self._token_bytes is None:
            self._token_bytes = _token_bytes(self.tokenizer, self.vocab_size)
        return self._token_bytes


def _token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[bytes | None] = [None] * vocab_size
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel" or (decoder is not None and "ByteLevel" in repr(decoder))
    added = {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    special |= added
    for text, i in vocab.items():
        if not 0 <= i < vocab_size or i in special:
            continue
        if byte_level:
            try:
                out[i] = bytes(byte_decoder[c] for c in text)
            except KeyError:  # an added non-special token stored as plain text
                out[i] = text.encode()
        elif text.startswith("<0x") and text.endswith(">") and len(text) == 6:  # sentencepiece byte fallback
            out[i] = bytes([int(text[3:5], 16)])
        else:
            out[i] = text.replace("\u2581", " ").encode()
    return out


class GuidedMatcher(ABC):
    """Follows one sequence through a compiled grammar (see the module docstring)."""

    @abstractmethod
    def fill_bitmask(self, bitmask, row: int) -> None: ...

    @abstractmethod
    def accept_token(self, token_id: int) -> bool: ...

    @abstractmethod
    def rollback(self, num_tokens: int) -> None: ...

    @abstractmethod
    def is_terminated(self) -> bool: ...

    @abstractmethod
    def forced_continuation(self) -> str: ...

    @abstractmethod
    def fork(self) -> "GuidedMatcher": ...

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence["GuidedMatcher"], bitmask, rows: Sequence[int]) -> None:
        """``matchers[i].fill_bitmask(bitmask, rows[i])`` for matchers of this class; a backend whose
        library fills a batch in one call overrides it (the runtime calls it once per step and class)."""
        for m, row in zip(matchers, rows):
            m.fill_bitmask(bitmask, row)


class CompiledGrammar(ABC):
    """A spec compiled against one vocabulary; immutable and shareable between requests."""

    backend: str = ""

    @abstractmethod
    def matcher(self) -> GuidedMatcher: ...


class GuidedBackend(ABC):
    """A guided-decoding library behind the contract. Subclasses set ``name`` and ``kinds``."""

    name: ClassVar[str] = ""
    #: The spec kinds this backend can compile at all.
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, vocab: VocabInfo):
        self.vocab = vocab

    @classmethod
    def available(cls) -> str | None:
        """None if the backend's library imports; otherwise why not (shown by ``tokenmill plugins``)."""
        return None

    @classmethod
    def validate(cls, spec: GuidedSpec) -> None:
        """Raise :class:`GuidedSpecError` naming ``spec.param`` if the spec is invalid or unsupported here."""
        if spec.kind not in cls.kinds:
            raise GuidedSpecError(f"the {cls.name} backend does not support {spec.kind} "
                                  f"(it supports {', '.join(cls.kinds)})", spec.param)

    @abstractmethod
    def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        """Compile ``spec`` (may take a while; called off the step loop, possibly from threads)."""
