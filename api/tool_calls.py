"""Tool calling on ``/v1/chat/completions``: checking the request, the template arguments, the
constraint for ``required`` / named choices, and turning output into ``message.tool_calls`` or
streamed ``delta.tool_calls`` (the rules are in :mod:`tokenmill.guided.tools`)."""
from __future__ import annotations

import dataclasses

from tokenmill.api.errors import bad_request
from tokenmill.guided.tool_parsers import ToolStreamer
from tokenmill.guided.tools import ToolCalling, ToolError, history_for_template


def message(calling: ToolCalling, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The non-streaming ``message`` for one choice's output, and its finish reason."""
    parsed = calling.parse(text)
    msg = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        msg["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return msg, finish_reason


def streamer(calling: ToolCalling) -> "ChoiceStream | None":
    return None if calling.reader is None else ChoiceStream(calling)


class ChoiceStream:
    """One streamed choice: text deltas in, ``delta`` dicts out."""

    def __init__(self, calling: ToolCalling):
        self.calling, self.parallel = calling, calling.choice.parallel
        self.streamer: ToolStreamer = calling.reader.streamer()

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, pieces = self.streamer.feed(self.calling.clean(text), final=finish_reason is not None)
        if not self.parallel:
            pieces = [p for p in pieces if p["index"] == 0]
        delta: dict = {}
        if content:
            delta["content"] = content
        if pieces:
            delta["tool_calls"] = pieces
        if finish_reason == "stop" and self.streamer.has_calls:
            finish_reason = "tool_calls"
        return delta, finish_reason


def prepare(req, tool_parser: str) -> ToolCalling | None:
    """The request's tool calling (None without tools); 400s name the field at fault."""
    try:
        calling = ToolCalling.build(req.tools, req.tool_choice, req.parallel_tool_calls, tool_parser)
    except ToolError as exc:
        raise bad_request(str(exc), exc.param) from None
    return calling


def template_messages(conversation: list[dict]) -> list[dict]:
    try:
        return history_for_template(conversation)
    except ToolError as exc:
        raise bad_request(str(exc), exc.param) from None


def adjust_params(srv, calling: ToolCalling | None, params):
    """Constrain the output for ``required`` / named choices; keep special tokens in the text when
    the parser's markers are special tokens of this tokenizer."""
    if calling is None or calling.reader is None:
        return params
    spec = calling.spec()
    if spec is not None:
        param, what = ("tool_choice", f"tool_choice {calling.choice.mode!r}") if calling.choice.constrained \
            else ("tools", "a strict tool")
        if params.structured_outputs is not None:
            raise bad_request(f"{what} constrains the output itself; it cannot be combined with response_format or "
                              f"structured_outputs.", param)
        params = srv.constrain(params, spec)
    special = list(getattr(srv.tokenizer, "all_special_tokens", []) or [])
    if params.skip_special_tokens and any(m in special for m in calling.reader.markers):
        params = dataclasses.replace(params, skip_special_tokens=False)
        calling.drop = tuple(t for t in special if t not in calling.reader.markers)
    return params
