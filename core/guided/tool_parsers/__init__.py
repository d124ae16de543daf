"""Tool-call parsers: read a model's tool calls out of its output text, whole or streamed.

One file per format; :data:`TOOL_PARSERS` maps the names ``--tool-call-parser`` takes to the
classes. The contract is :class:`~tokenmill.guided.tool_parsers.base.ToolParser`.
"""
from __future__ import annotations

from tokenmill.guided.tool_parsers.base import ParsedToolOutput, ToolCall, ToolParser, ToolStreamer, new_call_id
from tokenmill.guided.tool_parsers.hermes import HermesToolParser
from tokenmill.guided.tool_parsers.llama3_json import Llama3JsonToolParser
from tokenmill.guided.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    """Add a parser class under its ``name`` (a later one with the same name replaces it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TOOL_PARSERS[cls.name] = cls
    return cls


for _cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser):
    register_tool_parser(_cls)


def get_tool_parser(name: str) -> ToolParser:
    """A parser by name; ValueError listing the known names otherwise."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return cls()


def default_tool_parser(chat_template: str | None) -> str:
    """The parser matching the format a chat template asks for (hermes when it says nothing)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "<|eom_id|>" in t:
        return "llama3_json"
    return "hermes"


__all__ = ["TOOL_PARSERS", "ParsedToolOutput", "ToolCall", "ToolParser", "ToolStreamer", "default_tool_parser",
           "get_tool_parser", "new_call_id", "register_tool_parser"]
