"""The tool-parser contract, and the JSON scanning the parsers share.

A :class:`ToolParser` reads a model's output in one tool-calling format. It implements one
method, :meth:`ToolParser.scan`: split the text seen so far into *segments*, plain content
(``str``) and tool calls (:class:`CallRegion`), such that the content and each call's raw
``args`` only ever grow as more text arrives (prefix-stable). From that one method:

- :meth:`ToolParser.parse` turns complete output into content and :class:`ToolCall` s;
- :class:`ToolStreamer` turns output deltas into OpenAI ``delta.content`` / ``delta.tool_calls``
  pieces: a call's first piece carries ``index``, ``id``, ``type`` and ``function.name``, the
  next ones ``function.arguments`` fragments whose concatenation is the call's arguments JSON.

Output that only looks like a call (malformed JSON, no ``name``) is content. A streamed call
whose JSON never completes (output cut by ``max_tokens``) has been announced and stays a call
with partial arguments; the non-streaming response returns that text as content.
"""
from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

_DECODER = json.JSONDecoder()
_NAME = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')
_ARGS = re.compile(r'[,{]\s*"(arguments|parameters)"\s*:\s*')


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function ``name`` and its ``arguments`` as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedToolOutput:
    """Complete output split into ``content`` (None when only whitespace is left) and ``tool_calls``."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class CallRegion:
    """The text of one tool call, possibly still incomplete.

    ``raw`` is the region's whole text (what it becomes if it turns out not to be a call);
    ``closed``: no more text will join the region; ``name`` the function name once it is
    complete; ``args`` the arguments' raw JSON text seen so far (grows by appending); ``done``:
    the call is complete and ``arguments`` is its parsed arguments value. A region that is
    closed but not done is content.
    """

    raw: str
    closed: bool = False
    name: str | None = None
    args: str = ""
    done: bool = False
    arguments: Any = None

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)


Segment = Union[str, CallRegion]


class ToolParser(ABC):
    """One output format. Subclasses set ``name`` and implement :meth:`scan`."""

    name: ClassVar[str] = ""
    #: Marker strings the format uses that a tokenizer may hold as special tokens (the server
    #: keeps special tokens in the text when one of these is a special token of the model).
    markers: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def scan(self, text: str, final: bool) -> list[Segment]:
        """Split ``text`` into content and call segments, in order.

        With ``final`` False more text may follow: content that could be the start of a
        marker is held back (left out). With ``final`` True the text is complete.
        """

    def structural_tag(self, tools: list[dict]) -> dict | None:
        """A structural tag (vLLM's ``{"structures", "triggers"}`` form) that lets the model write
        freely but constrains each call it starts, in this format, to one of ``tools`` with
        arguments valid under that tool's schema; None if the format cannot be constrained so
        (``strict`` tools are then refused with this parser)."""
        return None

    def parse(self, text: str) -> ParsedToolOutput:
        """Complete output: content (outside the calls, stripped) and the complete calls."""
        content, calls = [], []
        for seg in self.scan(text, final=True):
            if isinstance(seg, str):
                content.append(seg)
            elif seg.done:
                calls.append(ToolCall(seg.name, seg.arguments_json))
            else:
                content.append(seg.raw)
        text_out = "".join(content).strip()
        return ParsedToolOutput(text_out or None, calls)

    def streamer(self) -> "ToolStreamer":
        return ToolStreamer(self)


@dataclass
class _Announced:
    index: int
    id: str
    sent: int = 0  # characters of args sent
    done: bool = False


class ToolStreamer:
    """Incremental parsing of one output: :meth:`feed` each text delta, ``final=True`` with the last."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self._content_sent = 0
        self._announced: dict[int, _Announced] = {}  # region position -> its stream state
        self.calls: list[ToolCall] = []  # complete calls, in announcement order (ids as streamed)

    @property
    def has_calls(self) -> bool:
        return bool(self._announced)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """``(content delta, tool_calls delta pieces)`` for this text delta."""
        self.text += delta
        content, pieces = [], {}
        position = 0
        for seg in self.parser.scan(self.text, final):
            if isinstance(seg, str):
                content.append(seg)
                continue
            k, position = position, position + 1
            state = self._announced.get(k)
            if state is None:
                if seg.name is None or (seg.closed and not seg.done):
                    if final or seg.closed:  # never became a call: it was text
                        content.append(seg.raw)
                    continue
                state = self._announced[k] = _Announced(len(self._announced), new_call_id())
                pieces[state.index] = {"index": state.index, "id": state.id, "type": "function",
                                       "function": {"name": seg.name, "arguments": ""}}
            if len(seg.args) > state.sent:
                piece = pieces.setdefault(state.index, {"index": state.index, "function": {}})
                piece["function"]["arguments"] = seg.args[state.sent:]
                state.sent = len(seg.args)
            if seg.done and not state.done:
                state.done = True
                self.calls.append(ToolCall(seg.name, seg.args, state.id))
        joined = "".join(content)
        new = joined[self._content_sent:]
        self._content_sent = max(self._content_sent, len(joined))
        return new, [pieces[i] for i in sorted(pieces)]


def parameters_schema(tool: dict) -> dict:
    """A function tool's parameters schema (an empty object schema when it declares none)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


# -- shared scanning ----------------------------------------------------------------------------------
def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (may grow into it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_at_marker(text: str, start: int, marker: str, final: bool) -> tuple[str, int]:
    """Content from ``start`` up to the next ``marker`` and where the marker starts (-1: none yet).

    Without a marker and not ``final``, a trailing partial marker is held back.
    """
    i = text.find(marker, start)
    if i >= 0:
        return text[start:i], i
    end = len(text) if final else len(text) - held_back(text[start:], marker)
    return text[start:end], -1


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def scan_object(text: str, i: int, end: int | None = None) -> tuple[CallRegion, int | None]:
    """The call object starting at ``text[i] == "{"`` (and not past ``end``).

    Returns the region and the index just after the object, or None while it is incomplete.
    A complete object is a call when it has a string ``name``; its arguments are under
    ``arguments`` or ``parameters`` (an object, or a string holding JSON), ``{}`` when absent.
    """
    end = len(text) if end is None else end
    body = text[:end]
    try:
        obj, stop = _DECODER.raw_decode(body, i)
    except ValueError:
        obj, stop = None, None
    if stop is not None:
        region = CallRegion(body[i:stop], closed=True)
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            key = next((k for k in ("arguments", "parameters") if k in obj), None)
            value = obj[key] if key else {}
            if isinstance(value, str) or isinstance(value, dict):
                region.name, region.done, region.arguments = obj["name"], True, value
                region.args = value if isinstance(value, str) else _args_text(body, i, stop, value)
        return region, stop
    region = CallRegion(body[i:])
    m = _NAME.match(body, i)
    if m:
        try:
            region.name = json.loads(m.group(1))
        except ValueError:
            return region, None
        a = _ARGS.search(body, m.end())
        if a is not None and a.end() < len(body) and body[a.end()] == "{":
            s = a.end()
            try:
                _, e = _DECODER.raw_decode(body, s)
                region.args = body[s:e]
            except ValueError:
                region.args = body[s:]
    return region, None


def _args_text(text: str, start: int, stop: int, value: dict) -> str:
    """The arguments object's raw text inside the complete object ``text[start:stop]`` (so the
    streamed fragments, which are raw text, add up to it); normalised JSON if it cannot be located."""
    a = _ARGS.search(text, start, stop)
    if a is not None:
        try:
            found, e = _DECODER.raw_decode(text[:stop], a.end())
            if found == value:
                return text[a.end():e]
        except ValueError:
            pass
    return json.dumps(value, ensure_ascii=False)


def scan_call_array(text: str, i: int, final: bool) -> tuple[list[Segment], int | None]:
    """A JSON array of call objects starting at ``text[i] == "["``: its call regions, and the index
    after the closing ``]`` (None while it is open). An element that is not an object ends the
    array's calls: the rest is one region that will become content."""
    segments: list[Segment] = []
    j = skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "]":
            return segments, j + 1
        if text[j] != "{":
            segments.append(CallRegion(text[j:], closed=final))
            return segments, None
        region, stop = scan_object(text, j)
        segments.append(region)
        if stop is None:
            return segments, None
        j = skip_ws(text, stop)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
    return segments, None
