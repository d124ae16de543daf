"""``POST /v1/completions``: text or token-id prompts, streaming or not, with echo and logprobs."""
from __future__ import annotations

import dataclasses

from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.api.errors import bad_request
from tokenmill.api.fields import check_fields
from tokenmill.api.protocol import CompletionRequest
from tokenmill.api.serving import MAX_PROMPTS, Serving, Submitted, event_stream, sse, usage
from tokenmill.tokenizer import fim_prompt, fim_tokens


async def _prompts(srv: Serving, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """Each prompt as ``(text or None, token ids)``; a list of strings or of id lists is a batch."""
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise bad_request("prompt must not be empty.", "prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"a prompt batch may hold at most {MAX_PROMPTS} prompts, got {len(items)}.", "prompt")
    if req.suffix:  # an empty suffix asks for nothing more than a plain completion
        return await srv.off_loop(lambda: [_fill_in_the_middle(srv, req, item) for item in items])
    texts = [item for item in items if isinstance(item, str)]
    encoded = iter(await srv.encode_many(texts, req.add_special_tokens, "prompt"))
    return [(item, next(encoded)) if isinstance(item, str) else (None, list(item)) for item in items]


def _fill_in_the_middle(srv: Serving, req: CompletionRequest, item) -> tuple[str | None, list[int]]:
    """The prompt asking for what goes between ``item`` (the prefix) and ``req.suffix``, built from
    the tokenizer's fill-in-the-middle tokens; a tokenizer without them cannot honour ``suffix``."""
    fim = fim_tokens(srv.tokenizer)
    if fim is None:
        raise bad_request("suffix needs a model trained for fill-in-the-middle; this model's tokenizer has no "
                          "fill-in-the-middle tokens (such as <fim_prefix>, <fim_suffix>, <fim_middle>).", "suffix")
    if req.echo:
        raise bad_request("suffix cannot be combined with echo.", "suffix")
    tok = srv.tokenizer
    lead = tok.encode("", add_special_tokens=req.add_special_tokens)
    prefix = tok.encode(item, add_special_tokens=False) if isinstance(item, str) else list(item)
    return (item if isinstance(item, str) else None,
            fim_prompt(tok, fim, prefix, tok.encode(req.suffix, add_special_tokens=False), lead))


async def create_completion(srv: Serving, req: CompletionRequest):
    srv.check_model(req.model)
    check_fields(req, "completions")
    srv.log_unknown(req, "completions")
    params = srv.sampling_params(req)
    prompts = await _prompts(srv, req)
    for _, ids in prompts:
        srv.check_prompt(ids, params, "prompt", req.max_tokens_param)
    sub = srv.submit("cmpl", prompts, params, req.stream, req.cache_salt)
    if req.stream:
        await srv.accepted(sub)
        return StreamingResponse(event_stream(srv, sub, _stream(srv, req, sub)), media_type="text/event-stream")
    finals = await srv.final_outputs(sub)
    return JSONResponse(_response(srv, req, sub, finals))


def _echo_text(srv: Serving, text: str | None, ids: list[int]) -> str:
    return text if text is not None else srv.tokenizer.decode(ids)


def _best(req: CompletionRequest, outputs: list) -> list:
    """The n continuations to return: all of them, or with ``best_of`` the n of highest cumulative
    logprob (of the raw model distribution), renumbered 0..n-1 in that order."""
    if not req.picks_best:
        return outputs
    ranked = sorted(outputs, key=lambda c: (-(c.cumulative_logprob if c.cumulative_logprob is not None
                                                else float("-inf")), c.index))
    return [dataclasses.replace(c, index=i) for i, c in enumerate(ranked[:req.n])]


def _response(srv: Serving, req: CompletionRequest, sub: Submitted, finals: dict) -> dict:
    choices, completion_tokens, cached = [], 0, 0
    for rid, (pi, prompt) in sub.prompts.items():
        out = finals[rid]
        cached += out.num_cached_tokens
        completion_tokens += sum(len(c.token_ids) for c in out.outputs)  # best_of: all of them were made
        for c in _best(req, out.outputs):
            text, logprobs = c.text, None
            if req.echo:
                text = _echo_text(srv, prompt.text, prompt.token_ids) + text
            if req.logprobs is not None:
                ids, positions = list(c.token_ids), list(c.logprobs or [])
                if req.echo:
                    ids = prompt.token_ids + ids
                    plp = out.prompt_logprobs or [None] * len(prompt.token_ids)
                    positions = list(plp) + positions
                logprobs, _ = srv.completion_logprobs(ids, positions)
            choice = {"index": pi * req.n + c.index, "text": text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = srv.prompt_logprobs(out.prompt_logprobs)
            choices.append(choice)
    choices.sort(key=lambda ch: ch["index"])
    return {"id": sub.id, "object": "text_completion", "created": sub.created,
            "model": req.model or srv.model_name, "choices": choices,
            "usage": usage(sub.prompt_tokens, completion_tokens, cached)}


async def _stream(srv: Serving, req: CompletionRequest, sub: Submitted):
    head = {"id": sub.id, "object": "text_completion", "created": sub.created,
            "model": req.model or srv.model_name}
    finished, echoed = set(), set()
    offsets: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    async for out in srv.engine.results(sub.group):
        pi, prompt = sub.prompts[out.request_id]
        for c in out.outputs:
            key = (pi, c.index)
            if key in finished or not (c.text or c.token_ids or c.finish_reason):
                continue
            text, ids, positions = c.text, list(c.token_ids), list(c.logprobs or [])
            choice = {"index": pi * req.n + c.index, "text": text, "logprobs": None,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if key not in echoed:  # the first chunk of this choice carries the prompt's part
                echoed.add(key)
                if req.echo:
                    choice["text"] = _echo_text(srv, prompt.text, prompt.token_ids) + text
                    ids = prompt.token_ids + ids
                    positions = list(out.prompt_logprobs or [None] * len(prompt.token_ids)) + positions
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = srv.prompt_logprobs(out.prompt_logprobs)
            if req.logprobs is not None:
                choice["logprobs"], offsets[key] = srv.completion_logprobs(ids, positions, offsets.get(key, 0))
            counts[key] = counts.get(key, 0) + len(c.token_ids)
            chunk = {**head, "choices": [choice]}
            if req.continuous_usage:
                chunk["usage"] = usage(sub.prompt_tokens, sum(counts.values()))
            if c.finish_reason is not None:
                finished.add(key)
            yield sse(chunk)
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(sub.prompt_tokens, sum(counts.values()))})
