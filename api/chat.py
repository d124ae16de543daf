"""``POST /v1/chat/completions``: the tokenizer's chat template, then generation, streaming or not."""
from __future__ import annotations

from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.api.errors import bad_request
from tokenmill.api.fields import check_fields
from tokenmill.api.protocol import ChatCompletionRequest
from tokenmill.api.serving import Serving, Submitted, event_stream, sse, usage
from tokenmill.api.tool_calls import adjust_params, message, prepare, streamer, template_messages
from tokenmill.guided.tools import ToolCalling
from tokenmill.api.store import check_metadata, disabled, stored_message


async def render(srv: Serving, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                 add_special_tokens: bool, chat_template: str | None = None, kwargs: dict | None = None):
    """``(prompt text, token ids)`` of a conversation; template problems are 400s naming ``messages``
    (or ``chat_template``), all of it done off the event loop."""
    text = await srv.render_chat(messages, add_generation_prompt, continue_final_message, chat_template, kwargs)
    return text, await srv.encode(text, add_special_tokens, "messages")


def _echo(req: ChatCompletionRequest, conversation: list[dict]) -> str:
    last = conversation[-1]
    return last["content"] if req.echo and last.get("role") == "assistant" else ""


async def create_chat_completion(srv: Serving, req: ChatCompletionRequest):
    srv.check_model(req.model)
    check_fields(req, "chat.completions")
    srv.log_unknown(req, "chat.completions")
    params = srv.sampling_params(req)
    try:
        conversation = req.conversation()
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    calling = prepare(req, srv.tool_parser)
    kwargs = dict(req.chat_template_kwargs or {})
    if calling is not None and calling.tools:
        kwargs["tools"] = calling.tools
    text, ids = await render(srv, template_messages(conversation), req.add_generation_prompt, req.continue_final_message,
                       req.add_special_tokens, req.chat_template, kwargs)
    if req.store and srv.store is None:
        raise disabled()
    metadata = check_metadata(req.metadata)
    srv.check_prompt(ids, params, "messages", req.max_tokens_param)
    params = adjust_params(srv, calling, params)
    sub = srv.submit("chatcmpl", [(text, ids)], params, req.stream, req.cache_salt)
    echo = _echo(req, conversation)
    if req.stream:
        await srv.accepted(sub)
        return StreamingResponse(event_stream(srv, sub, _stream(srv, req, sub, echo, calling, metadata)),
                                 media_type="text/event-stream")
    finals = await srv.final_outputs(sub)
    resp = _response(srv, req, sub, finals, echo, calling)
    if req.store:
        await _save(srv, req, resp, metadata)
    return JSONResponse(resp)


async def _save(srv: Serving, req: ChatCompletionRequest, resp: dict, metadata: dict | None) -> None:
    messages = [stored_message(m.model_dump(exclude_none=True)) for m in req.messages]
    await srv.store.save(resp, messages, metadata)


def _logprobs(srv: Serving, req: ChatCompletionRequest, c) -> dict | None:
    if not req.logprobs:
        return None
    return {"content": srv.chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0), "refusal": None}


def _response(srv: Serving, req: ChatCompletionRequest, sub: Submitted, finals: dict, echo: str,
              calling: ToolCalling | None) -> dict:
    (out,) = finals.values()
    choices = []
    for c in out.outputs:
        if calling is None:
            msg, finish_reason = {"role": "assistant", "content": echo + c.text, "refusal": None}, c.finish_reason
        else:
            msg, finish_reason = message(calling, c.text, c.finish_reason)
            if echo and msg["content"] is not None:
                msg["content"] = echo + msg["content"]
        choices.append({"index": c.index, "message": msg, "logprobs": _logprobs(srv, req, c),
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    resp = {"id": sub.id, "object": "chat.completion", "created": sub.created,
            "model": req.model or srv.model_name, "choices": choices,
            "usage": usage(sub.prompt_tokens, completion_tokens, out.num_cached_tokens)}
    if req.prompt_logprobs is not None:
        resp["prompt_logprobs"] = srv.prompt_logprobs(out.prompt_logprobs)
    return resp


async def _stream(srv: Serving, req: ChatCompletionRequest, sub: Submitted, echo: str, calling: ToolCalling | None,
                  metadata: dict | None = None):
    head = {"id": sub.id, "object": "chat.completion.chunk", "created": sub.created,
            "model": req.model or srv.model_name}
    counts = [0] * req.n
    finished = set()
    streams = [streamer(calling) if calling is not None else None for _ in range(req.n)]
    kept = [{"index": i, "message": {"role": "assistant", "content": echo, "refusal": None},
             "logprobs": {"content": [], "refusal": None} if req.logprobs else None, "finish_reason": None,
             "stop_reason": None} for i in range(req.n)] if req.store else None

    def chunk(choices):
        c = {**head, "choices": choices}
        if req.continuous_usage:
            c["usage"] = usage(sub.prompt_tokens, sum(counts))
        return sse(c)

    # The role comes first, as OpenAI sends it (with the echoed text, if any).
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": echo, "refusal": None}, "logprobs": None,
                      "finish_reason": None}])
    async for out in srv.engine.results(sub.group):
        for c in out.outputs:
            if c.index in finished or not (c.text or c.token_ids or c.finish_reason):
                continue
            counts[c.index] += len(c.token_ids)
            finish_reason = c.finish_reason
            if streams[c.index] is not None:
                delta, finish_reason = streams[c.index].delta(c.text, c.finish_reason)
                if not delta and finish_reason is None and not req.logprobs:
                    continue  # text held back while the parser decides (it comes with a later delta)
            else:
                delta = {"content": c.text} if c.text or c.finish_reason is None else {}
            choice = {"index": c.index, "delta": delta, "logprobs": _logprobs(srv, req, c),
                      "finish_reason": finish_reason}
            if kept is not None:
                kept[c.index]["message"]["content"] += c.text
                if choice["logprobs"] is not None:
                    kept[c.index]["logprobs"]["content"] += choice["logprobs"]["content"]
                kept[c.index]["finish_reason"], kept[c.index]["stop_reason"] = finish_reason, c.stop_reason
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
                finished.add(c.index)
            yield chunk([choice])
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(sub.prompt_tokens, sum(counts))})
    if kept is not None:  # the whole stream went out: keep it as the one completion it adds up to
        await _save(srv, req, {**head, "object": "chat.completion", "choices": kept,
                               "usage": usage(sub.prompt_tokens, sum(counts))}, metadata)
