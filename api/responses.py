"""``POST /v1/responses``: OpenAI's Responses API for plain text in and text out.

The input (a string, or a list of message items with text content) and ``instructions`` (a
system message first) are rendered with the chat template and generated like a chat
completion; the result is one ``message`` output item holding one ``output_text`` part.
With ``stream`` the events come as OpenAI streams them: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` per piece, then the matching ``.done`` events and
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it short).

Responses are not stored: ``store: true``, ``previous_response_id`` and the other fields that
need state or tools this endpoint lacks are refused with a 400 that names them.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Union

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from tokenmill.api.async_engine import RequestRejected
from tokenmill.api.chat import render
from tokenmill.api.errors import bad_request, invalid_params
from tokenmill.api.serving import Serving, engine_error
from tokenmill.engine.core_process import CoreDead
from tokenmill.sampling_params import SamplingParams

#: Fields that would change what a response is and need what this endpoint lacks (tools,
#: stored state, reasoning, other output formats): refused unless absent or empty.
_UNSUPPORTED = ("tools", "previous_response_id", "conversation", "prompt", "reasoning", "include",
                "max_tool_calls", "top_logprobs", "background", "prompt_cache_retention")
#: Fields that change nothing here (no tools, nothing to cache or bill): accepted.
_HARMLESS = {"user", "safety_identifier", "prompt_cache_key", "service_tier", "parallel_tool_calls",
             "truncation", "stream_options"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text", "text"}


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` (text only)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    tool_choice: Any = None

    def refused(self) -> str | None:
        """The first field set that this endpoint cannot honour."""
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            value = extra.get(name)
            if value not in (None, [], False, 0, {}):
                return name
        unknown = sorted(set(extra) - set(_UNSUPPORTED) - _HARMLESS)
        return unknown[0] if unknown else None


def _conversation(req: ResponsesRequest) -> list[dict]:
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("input must not be empty.", "input")
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(f"input[{i}] is a {str(kind)[:40]!r} item; only message items with text are "
                              f"supported.", "input")
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise bad_request(f"input[{i}].role must be one of {', '.join(_ROLES)}, got {item.get('role')!r:.60}.",
                              "input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                        or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad_request(f"input[{i}].content[{j}] is {str(kind)[:40]!r}; only text parts "
                                      f"(input_text, output_text) are supported.", "input")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"input[{i}].content must be a string or a list of text parts.", "input")
        messages.append({"role": role, "content": content})
    return messages


def _params(srv: Serving, req: ResponsesRequest) -> SamplingParams:
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(f"max_output_tokens must be at least 1, got {req.max_output_tokens}.", "max_output_tokens")
    d = srv.sampling_defaults
    try:
        return SamplingParams(temperature=req.temperature if req.temperature is not None else d.get("temperature", 1.0),
                              top_p=req.top_p if req.top_p is not None else d.get("top_p", 1.0),
                              top_k=d.get("top_k", 0), min_p=d.get("min_p", 0.0),
                              repetition_penalty=d.get("repetition_penalty", 1.0), max_tokens=req.max_output_tokens)
    except ValueError as exc:
        raise invalid_params(exc, {"temperature", "top_p"}) from None


def _check(req: ResponsesRequest) -> None:
    name = req.refused()
    if name is not None:
        raise bad_request(f"{name} is not supported by this server's /v1/responses (text input and output only; "
                          f"no tools, stored responses or reasoning).", name)
    if req.store:
        raise bad_request("store: responses are not stored on this server; send store: false or leave it out.",
                          "store")
    fmt = (req.text or {}).get("format")
    if fmt is not None and fmt.get("type") != "text":
        raise bad_request(f"text.format type {str(fmt.get('type'))[:40]!r} is not supported; only 'text'.", "text")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported (this endpoint has no tools).", "tool_choice")


def _usage(prompt_tokens: int, output_tokens: int, cached: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


class _Shape:
    """Builds the response object and its output item as the request goes."""

    def __init__(self, srv: Serving, req: ResponsesRequest, params: SamplingParams):
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.req, self.params, self.model = req, params, req.model or srv.model_name

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
            else []
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def response(self, status: str, output: list, usage: dict | None, reason: str | None = None) -> dict:
        r = self.req
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
                "model": self.model, "output": output, "error": None,
                "incomplete_details": {"reason": reason} if reason else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "temperature": self.params.temperature, "top_p": self.params.top_p,
                "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "previous_response_id": None,
                "store": False, "metadata": r.metadata or {}, "text": {"format": {"type": "text"}},
                "truncation": "disabled", "reasoning": None, "usage": usage, "user": (r.model_extra or {}).get("user")}


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


async def create_response(srv: Serving, req: ResponsesRequest):
    srv.check_model(req.model)
    _check(req)
    params = _params(srv, req)
    text, ids = await render(srv, _conversation(req), True, False, False)
    srv.check_prompt(ids, params, "input", "max_output_tokens")
    sub = srv.submit("resp", [(text, ids)], params, req.stream, None)
    shape = _Shape(srv, req, params)
    if req.stream:
        await srv.accepted(sub)
        return StreamingResponse(_stream(srv, sub, shape), media_type="text/event-stream")
    (out,) = (await srv.final_outputs(sub)).values()
    c = out.outputs[0]
    status, reason = _status(c.finish_reason)
    return JSONResponse(shape.response(status, [shape.message(c.text, status)],
                                       _usage(sub.prompt_tokens, len(c.token_ids), out.num_cached_tokens), reason))


async def _stream(srv: Serving, sub, shape: _Shape):
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        body = {"type": kind, **fields, "sequence_number": seq}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

    where = {"item_id": shape.item_id, "output_index": 0}
    text, count, finish = "", 0, None
    try:
        yield event("response.created", response=shape.response("in_progress", [], None))
        yield event("response.in_progress", response=shape.response("in_progress", [], None))
        yield event("response.output_item.added", output_index=0, item=shape.message("", "in_progress"))
        yield event("response.content_part.added", **where, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async for out in srv.engine.results(sub.group):
            c = out.outputs[0]
            count += len(c.token_ids)
            finish = c.finish_reason or finish
            if c.text:
                text += c.text
                yield event("response.output_text.delta", **where, content_index=0, delta=c.text, logprobs=[])
        status, reason = _status(finish)
        item = shape.message(text, status)
        yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **where, content_index=0, part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        yield event(f"response.{status}", response=shape.response(status, [item], _usage(sub.prompt_tokens, count),
                                                                  reason))
    except (RequestRejected, CoreDead) as exc:
        err = engine_error(exc)
        yield event("error", code=err.code, message=err.message, param=err.param)
    finally:
        if not sub.group.done:
            srv.engine.abort(sub.group)
