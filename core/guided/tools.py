"""Tool calling shared by the server and ``LLM.chat``: checking ``tools`` / ``tool_choice``, the
constraint for ``required`` and named choices, and reading their constrained output.

- ``none``: the tools are rendered in the chat template, the output is plain content.
- ``auto``: the output is parsed with the configured tool parser (:mod:`tokenmill.guided.tool_parsers`).
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}`` objects,
  each one of the tools with parameters valid under its schema (one element when
  ``parallel_tool_calls`` is false).
- a named function: the output is constrained to that function's parameters object.

So with ``required`` and named choices the arguments always validate against the schema,
whatever the model would have written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.guided.interface import GuidedSpec, GuidedSpecError
from tokenmill.guided.tool_parsers.base import (CallRegion, ParsedToolOutput, Segment, ToolParser, parameters_schema,
                                                scan_call_array, skip_ws)

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Largest number of tools a request may declare (OpenAI's limit).
MAX_TOOLS = 128


class ToolError(ValueError):
    """An invalid ``tools`` / ``tool_choice`` / ``messages`` value; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    """The resolved choice: ``mode`` is ``none``, ``auto``, ``required`` or ``named`` (then ``name``)."""

    mode: str
    name: str | None = None
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")


@dataclass
class ToolCalling:
    """One request's tool calling: the checked ``tools``, the resolved ``choice``, and the
    ``reader`` of its output (None for ``none``: plain content)."""

    tools: list[dict]
    choice: ToolChoice
    reader: ToolParser | None
    #: ``auto`` with a ``strict`` tool: the parser's structural tag constrains each call the model starts.
    strict_tag: dict | None = None
    #: Special-token texts to drop from the output before parsing (see :meth:`clean`).
    drop: tuple[str, ...] = ()

    @classmethod
    def build(cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
              tool_parser: str = "hermes") -> "ToolCalling | None":
        """None when the request has neither tools nor a tool_choice; raises :class:`ToolError`."""
        if tools is None and tool_choice is None:
            return None
        checked = check_tools(tools)
        choice = resolve_tool_choice(tool_choice, checked, parallel_tool_calls)
        reader = output_parser(choice, tool_parser)
        tag = None
        strict = [i for i, t in enumerate(checked) if t["function"].get("strict") is True]
        if choice.mode == "auto" and strict:
            tag = reader.structural_tag(checked)
            if tag is None:
                raise ToolError(f"tools[{strict[0]}].function.strict needs a tool-call format that can be constrained "
                                f"(hermes, llama3_json); the {tool_parser} parser's cannot", "tools")
        return cls(checked, choice, reader, tag)

    def spec(self) -> GuidedSpec | None:
        """The constraint: JSON for ``required`` / named choices, the parser's structural tag for
        ``auto`` with ``strict`` tools, None otherwise."""
        if self.choice.constrained:
            return constraint_spec(self.tools, self.choice)
        if self.strict_tag is not None:
            return GuidedSpec.structural_tag(self.strict_tag, param="tools")
        return None

    def clean(self, text: str) -> str:
        """``text`` without the special tokens kept only so that the parser sees its markers."""
        for tok in self.drop:
            text = text.replace(tok, "")
        return text

    def parse(self, text: str) -> ParsedToolOutput:
        """Complete output as content and calls (at most one when parallel calls are off). A
        constrained output carries no content; if it holds no complete call (cut by ``max_tokens``)
        all of it is returned as content."""
        if self.reader is None:
            return ParsedToolOutput(text, [])
        parsed = self.reader.parse(self.clean(text))
        calls = parsed.tool_calls if self.choice.parallel else parsed.tool_calls[:1]
        if self.choice.constrained:
            return ParsedToolOutput(None if calls else text, calls)
        return ParsedToolOutput(parsed.content, calls)


def check_tools(tools: Any) -> list[dict]:
    """The request's ``tools`` as OpenAI function-tool dicts; raises :class:`ToolError` naming the field."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of function tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools may hold at most {MAX_TOOLS} functions, got {len(tools)}", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise ToolError(f"{where}.type must be 'function' (only function tools are supported), got {kind!r}",
                            f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                            f"{where}.function.name")
        if name in names:
            raise ToolError(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"{where}.function.parameters")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def _check_schema(schema: Any, param: str) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise ToolError(f"{param} must be a JSON schema object, got {type(schema).__name__}", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolError(f"{param} is not a valid JSON schema: {exc.message}", param) from None


def resolve_tool_choice(tool_choice: Any, tools: list[dict], parallel_tool_calls: bool | None = None) -> ToolChoice:
    """``tool_choice`` checked against ``tools`` (default: ``auto`` with tools, ``none`` without)."""
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none", parallel=parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                            f"{tool_choice!r}", "tool_choice")
        if tool_choice != "none" and not tools:
            raise ToolError(f"tool_choice {tool_choice!r} requires tools", "tool_choice")
        return ToolChoice(tool_choice, parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError("tool_choice.function.name must be a string", "tool_choice")
        if not tools:
            raise ToolError("a named tool_choice requires tools", "tool_choice")
        if name not in names:
            raise ToolError(f"tool_choice names the function {name!r}, which is not in tools "
                            f"({', '.join(names)})", "tool_choice")
        return ToolChoice("named", name, parallel)
    raise ToolError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                    "{\"name\": ...}}", "tool_choice")


_parameters = parameters_schema


def constraint_schema(tools: list[dict], choice: ToolChoice) -> dict:
    """The JSON schema the output must follow for a ``required`` or named choice."""
    if choice.mode == "named":
        (tool,) = [t for t in tools if t["function"]["name"] == choice.name]
        return _parameters(tool)
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not choice.parallel:
        schema["maxItems"] = 1
    return schema


def constraint_spec(tools: list[dict], choice: ToolChoice) -> GuidedSpec:
    """The guided-decoding spec for a constrained choice (compact JSON: no free whitespace)."""
    try:
        return GuidedSpec.json_schema(constraint_schema(tools, choice), param="tools", any_whitespace=False)
    except GuidedSpecError as exc:
        raise ToolError(str(exc), "tools") from None


def output_parser(choice: ToolChoice, tool_parser: str) -> ToolParser | None:
    """How to read the output for this choice: None for ``none``, the named parser for ``auto``,
    the reader of the constrained JSON otherwise."""
    from tokenmill.guided.tool_parsers import get_tool_parser

    if choice.mode == "none":
        return None
    if choice.mode == "auto":
        return get_tool_parser(tool_parser)
    if choice.mode == "named":
        return NamedCallReader(choice.name)
    return CallArrayReader()


class NamedCallReader(ToolParser):
    """Output constrained to one function's arguments object: all of it is that call's arguments."""

    name = "named"

    def __init__(self, function: str):
        self.function = function

    def scan(self, text: str, final: bool) -> list[Segment]:
        region = CallRegion(text, name=self.function)
        i = skip_ws(text, 0)
        try:
            value, end = json.JSONDecoder().raw_decode(text, i)
        except ValueError:
            region.args = text[i:] if i < len(text) and text[i] == "{" else ""
            region.closed = final
            return [region]
        region.closed = True
        if isinstance(value, dict) and not text[end:].strip():
            region.args, region.arguments, region.done = text[i:end], value, True
        return [region]


class CallArrayReader(ToolParser):
    """Output constrained to ``[{"name": ..., "parameters": {...}}, ...]``."""

    name = "required"

    def scan(self, text: str, final: bool) -> list[Segment]:
        i = skip_ws(text, 0)
        if i >= len(text):
            return [CallRegion(text, closed=True)] if final and text else []
        if text[i] != "[":
            return [CallRegion(text, closed=True)]
        calls, _ = scan_call_array(text, i, final)
        if not calls and final:
            return [CallRegion(text, closed=True)]
        return calls


def history_for_template(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's ``tool_calls[].function.arguments``
    parsed to objects (templates serialise them), content ``""`` rather than missing.
    Raises :class:`ToolError` naming ``messages`` for malformed tool calls."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is None or calls == []:
            out.append(m)
            continue
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls must be a list on an assistant message", "messages")
        fixed = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ToolError(f"messages[{i}].tool_calls[{j}] must have function.name", "messages")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                                    "messages") from None
            fixed.append({**c, "type": c.get("type", "function"), "function": {**fn, "arguments": args}})
        out.append({**m, "tool_calls": fixed})
    return out
