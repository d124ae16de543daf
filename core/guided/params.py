"""``StructuredOutputsParams``: the per-request constraint, with vLLM's field names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.guided.interface import GuidedSpec, GuidedSpecError

#: ``backend`` values a request or the server may name.
BACKEND_CHOICES = ("auto", "xgrammar", "outlines")
#: The sub-fields of the API's ``structured_outputs`` (vLLM's names) and what each does, for the docs;
#: any other sub-field is a 400.
REQUEST_FIELDS = {
    "json": "a JSON schema", "regex": "a regex", "choice": "one of a list of strings",
    "grammar": "EBNF/GBNF or Lark (xgrammar)", "json_object": "true: any JSON object",
    "structural_tag": "xgrammar's or vLLM's structural tag (xgrammar)",
    "backend": "auto, xgrammar or outlines",
    "disable_fallback": "auto uses xgrammar only: what it cannot compile is a 400 instead of going to outlines",
    "disable_any_whitespace": "compact JSON",
    "whitespace_pattern": "the regex every whitespace of a JSON output matches (outlines; on xgrammar a 400 "
                          "naming it, so auto falls back to outlines)",
    "disable_additional_properties": "a json schema's objects hold only the properties they list, on both "
                                     "backends (both let an object that lists none hold any)",
}


@dataclass
class StructuredOutputsParams:
    """Exactly one of ``json`` (a schema: dict, JSON string or pydantic model class), ``regex``,
    ``choice`` (list of strings), ``grammar`` (EBNF/GBNF with ``::=`` rules, or Lark),
    ``json_object`` (True: any JSON object) or ``structural_tag`` (xgrammar's format, or vLLM's
    ``{"structures": [...], "triggers": [...]}``).

    ``backend``: ``xgrammar``, ``outlines`` or ``auto`` (None: the server's
    ``--structured-output-backend``). ``disable_fallback``: ``auto`` uses xgrammar only (a spec it
    cannot compile is an error instead of going to outlines). ``disable_any_whitespace``: compact
    JSON (no free whitespace). ``whitespace_pattern``: the regex every whitespace of a JSON output
    matches (outlines only; xgrammar refuses it, so ``auto`` falls back to outlines).
    ``disable_additional_properties``: json schemas allow no property they do not list, on every
    backend (both already keep an object that lists properties to those, but let one that lists
    none hold any). ``jump_forward``: None follows the engine's setting; False turns it off
    for this request.
    """

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    backend: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    disable_additional_properties: bool = False
    jump_forward: bool | None = None
    #: Where these params came from in a request body (error messages name it).
    param: str = "structured_outputs"

    def __post_init__(self):
        self.spec = self._spec()

    def _spec(self) -> GuidedSpec:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise GuidedSpecError(f"{self.param} must set exactly one of json, regex, choice, grammar, json_object, "
                                  f"structural_tag; got {', '.join(given) or 'none'}", self.param)
        if self.backend is not None and self.backend not in BACKEND_CHOICES:
            raise GuidedSpecError(f"{self.param}.backend must be one of {', '.join(BACKEND_CHOICES)}, "
                                  f"got {self.backend!r}", f"{self.param}.backend")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise GuidedSpecError(f"{self.param}.{name} must be a boolean", f"{self.param}.{name}")
        kind = given[0]
        # the offline/``structured_outputs`` form names the sub-field; API aliases name themselves
        param = f"{self.param}.{kind}" if self.param == "structured_outputs" else self.param
        if self.disable_additional_properties and kind != "json":
            raise GuidedSpecError(f"{self.param}.disable_additional_properties applies only to json schemas, "
                                  f"not {kind}", f"{self.param}.disable_additional_properties")
        ws = not self.disable_any_whitespace
        wp = self.whitespace_pattern
        if wp is not None and kind not in ("json", "json_object"):
            return GuidedSpec(kind, "", whitespace_pattern=wp, param=param)  # raises, naming the field
        if kind == "json":
            return GuidedSpec.json_schema(self.json, param=param, any_whitespace=ws, whitespace_pattern=wp,
                                          close_objects=self.disable_additional_properties)
        if kind == "choice":
            return GuidedSpec.choice(self.choice, param=param)
        if kind == "structural_tag":
            return GuidedSpec.structural_tag(self.structural_tag, param=param)
        if kind == "json_object":
            return GuidedSpec("json_object", "", any_whitespace=ws, whitespace_pattern=wp, param=param)
        value = getattr(self, kind)
        if not isinstance(value, str) or not value:
            raise GuidedSpecError(f"{param} must be a non-empty string", param)
        return GuidedSpec(kind, value, param=param)

    @classmethod
    def from_spec(cls, spec: GuidedSpec, backend: str | None = None) -> "StructuredOutputsParams":
        """Params carrying an already built spec (tool calling builds structural tags this way)."""
        self = cls.__new__(cls)
        for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
            setattr(self, name, None)
        self.backend, self.jump_forward, self.param = backend, None, spec.param
        self.disable_fallback = self.disable_any_whitespace = self.disable_additional_properties = False
        self.whitespace_pattern = spec.whitespace_pattern
        self.spec = spec
        return self
