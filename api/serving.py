"""What the completions and chat endpoints share: model names, parameter and prompt checks,
submission to the engine, error mapping, logprobs and usage formatting, SSE framing."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tokenmill.api.async_engine import AsyncEngine, PromptInput, RequestGroup, RequestRejected
from tokenmill.api.errors import APIError, bad_request, invalid_params
from tokenmill.api.template_sandbox import TemplateError, TemplateSandbox
from tokenmill.engine.core_process import CoreDead
from tokenmill.tokenizer import encode_bounded, render_chat
from tokenmill.guided.interface import GuidedSpec, GuidedSpecError
from tokenmill.guided.manager import choose_backend
from tokenmill.guided.params import StructuredOutputsParams

log = logging.getLogger(__name__)

#: Threads for tokenization and chat-template rendering; texts up to INLINE_CHARS are
#: tokenized on the event loop directly (a millisecond or so, less than the hop to a thread).
CPU_WORKERS = 2
INLINE_CHARS = 16384
#: Bounds on list-valued fields (OpenAI allows 4 stop sequences; we allow more, but not unbounded:
#: every stop string is searched for in each new piece of output text).
MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 64, 4096, 1024
#: Most prompts in one completions batch (OpenAI's limit for array inputs).
MAX_PROMPTS = 2048
#: Most top logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
_SAMPLING_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "logit_bias",
    "top_logprobs", "best_of", "suffix", "cache_salt", "max_completion_tokens", "stream_options",
}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _finite(x: float) -> float:
    # JSON has no -inf; vLLM reports impossible tokens as -9999.
    return max(float(x), -9999.0) if x == x else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


@dataclass
class Submitted:
    """A submitted HTTP request: its id, the engine group, and each engine request's prompt."""

    id: str
    group: RequestGroup
    prompts: dict[str, tuple[int, PromptInput]]  # engine request id -> (prompt index, prompt)
    created: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for _, p in self.prompts.values())


def model_sampling_defaults(model_path: str) -> dict:
    """The sampling defaults a checkpoint's generation_config.json declares (what vLLM applies too)."""
    try:
        with open(os.path.join(model_path, "generation_config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: cfg[k] for k in keys if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool)}


class Serving:
    """Per-server state and helpers for the OpenAI endpoints."""

    def __init__(self, engine: AsyncEngine, tokenizer, model_names: list[str], model_path: str,
                 tool_parser: str | None = None, max_n: int = 128, trust_request_chat_template: bool = False,
                 chat_template_timeout: float = 5.0, max_prompt_chars: int = 16 << 20):
        from tokenmill.guided.tool_parsers import default_tool_parser, get_tool_parser

        self.engine = engine
        self.max_n = max_n
        #: Rendered chat prompts longer than this are refused: a template must not turn a small
        #: request into a bigger prompt than the client could have sent itself (--max-body-bytes).
        self.max_prompt_chars = max_prompt_chars
        #: Seconds any chat template may render (--chat-template-timeout).
        self.chat_template_timeout = chat_template_timeout
        # Tokenization and template rendering of big inputs run here, not on the event loop.
        self.cpu = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="tokenmill-cpu")
        self.sandbox = TemplateSandbox(getattr(tokenizer, "special_tokens_map", {}), chat_template_timeout,
                                       max_prompt_chars) if trust_request_chat_template else None
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.model_path = model_path
        self.max_model_len = engine.info.max_model_len
        self.vocab_size = engine.info.vocab_size
        self._warned: set[tuple[str, str]] = set()
        self.sampling_defaults = model_sampling_defaults(model_path)
        self.structured_output_backend = getattr(engine.info, "structured_output_backend", "auto")
        self._guided_classes = None
        #: ``--tool-call-parser`` (default: the format the chat template asks for), read for tool_choice auto.
        self.tool_parser = tool_parser or default_tool_parser(getattr(tokenizer, "chat_template", None))
        get_tool_parser(self.tool_parser)  # an unknown name fails at start-up, not per request
        #: The stored-completions database (:class:`tokenmill.api.store.CompletionStore`), None when off.
        self.store = None

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None, param: str | None = "model") -> None:
        """404 ``model_not_found`` unless ``model`` is empty or a served name (``param``: where it came from)."""
        if model and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(self.model_names)}.",
                           param, "model_not_found")

    def log_unknown(self, req, endpoint: str) -> None:
        unknown = req.unknown_fields()
        if unknown:
            # Once per field at warning level: load generators send the same extras on every request.
            fresh = [f for f in unknown if (endpoint, f) not in self._warned]
            self._warned.update((endpoint, f) for f in fresh)
            log.log(logging.WARNING if fresh else logging.DEBUG, "%s: ignoring unknown field(s): %s",
                    endpoint, ", ".join(unknown))

    def sampling_params(self, req):
        for name in ("n", "best_of"):
            value = getattr(req, name, None)
            if value is not None and value > self.max_n:
                # One request forks this many sequences; OpenAI caps n at 128 too.
                raise bad_request(f"{name} must be at most {self.max_n}, got {value}.", name)
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > MAX_STOP or any(len(x) > MAX_STOP_CHARS for x in stop):
            raise bad_request(f"stop may hold at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters.",
                              "stop")
        if req.stop_token_ids is not None and len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids.", "stop_token_ids")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        try:
            params = req.sampling_params(self.sampling_defaults)
        except GuidedSpecError as exc:
            raise bad_request(str(exc), exc.param) from None
        except ValueError as exc:
            err = invalid_params(exc, _SAMPLING_FIELDS)
            if err.param == "max_tokens" and req.max_tokens_param == "max_completion_tokens":
                err.param = "max_completion_tokens"
                err.message = "max_completion_tokens" + err.message[len("max_tokens"):]
            raise err from None
        if params.structured_outputs is not None:
            self.check_structured_outputs(params.structured_outputs)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > MAX_LOGPROBS:
                raise bad_request(f"{name} must be at most {MAX_LOGPROBS}, got {value}.", name)
        return params

    def check_structured_outputs(self, so: StructuredOutputsParams) -> str:
        """Validate a constraint here, so that a bad schema, regex or grammar is a 400 naming its
        parameter (the engine would refuse it too, but later); returns the backend that will compile it."""
        if self._guided_classes is None:
            from tokenmill.guided.manager import backend_classes

            self._guided_classes = backend_classes()
        try:
            return choose_backend(so.spec, so.backend or self.structured_output_backend, self._guided_classes,
                                  not so.disable_fallback)
        except GuidedSpecError as exc:
            raise bad_request(str(exc), exc.param) from None

    def constrain(self, params, spec: GuidedSpec, backend: str | None = None):
        """Attach the output constraint ``spec`` to ``params`` (validated: a 400 naming ``spec.param``
        if it is invalid) and return ``params``. Tool calling builds its constraints through this."""
        so = StructuredOutputsParams.from_spec(spec, backend)
        self.check_structured_outputs(so)
        params.structured_outputs = so
        return params

    # -- off-loop CPU work ----------------------------------------------------------------------
    async def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of ``text``; a prompt longer than the context is a 400 (counted, not listed)."""
        return (await self.encode_many([text], add_special_tokens, param))[0]

    async def encode_many(self, texts: list[str], add_special_tokens: bool, param: str) -> list[list[int]]:
        """Token ids of each text (a batch of prompts or inputs), in one hop to a worker thread
        unless they are short together; any text longer than the context is a 400."""
        def run():
            return [encode_bounded(self.tokenizer, t, add_special_tokens, self.max_model_len) for t in texts]

        if sum(map(len, texts)) <= INLINE_CHARS:
            results = run()
        else:
            results = await asyncio.get_running_loop().run_in_executor(self.cpu, run)
        for ids in results:
            if isinstance(ids, int):
                raise self._too_long(ids, param)
        return results

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on a CPU worker thread (what may take long: tokenizing, decoding)."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def decode(self, ids: list[int]) -> str:
        if len(ids) <= INLINE_CHARS // 4:
            return self.tokenizer.decode(ids)
        return await asyncio.get_running_loop().run_in_executor(self.cpu, self.tokenizer.decode, ids)

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                          chat_template: str | None = None, kwargs: dict | None = None) -> str:
        """The conversation through the chat template, off the event loop and bounded.

        The model's own template (trusted, from the operator) renders in a worker thread; a
        request's ``chat_template`` only when the server trusts them, in the sandbox's worker
        processes under a deadline. The model's template stops itself at the same deadline
        (``tokenmill.template_budget``). Either way the text may not exceed ``max_prompt_chars``.
        """
        if chat_template is not None:
            if self.sandbox is None:
                raise bad_request("this server does not accept a chat_template in requests (the operator can allow "
                                  "it with --trust-request-chat-template).", "chat_template")
            if add_generation_prompt and continue_final_message:
                raise bad_request("add_generation_prompt and continue_final_message cannot both be true", "messages")
            try:
                return await self.sandbox.render(chat_template, messages, add_generation_prompt,
                                                 continue_final_message, kwargs)
            except TemplateError as exc:
                raise bad_request(str(exc), "chat_template") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.cpu, lambda: render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message,
                                              timeout=self.chat_template_timeout, max_chars=self.max_prompt_chars,
                                              **(kwargs or {})))
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)
        if self.sandbox is not None:
            self.sandbox.close()

    def _too_long(self, n: int, param: str) -> APIError:
        return bad_request(f"This model's maximum context length is {self.max_model_len} tokens, but the prompt is "
                           f"{n} tokens long.", param, "context_length_exceeded")

    def check_prompt(self, ids: list[int], params, param: str, max_tokens_param: str = "max_tokens") -> None:
        """The engine's own admission checks, done here so that the error names the parameter."""
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise bad_request("the prompt must contain at least one token.", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"the prompt contains token id(s) {bad[:5]} outside the vocabulary "
                              f"(size {self.vocab_size}).", param)
        if n > limit or (n == limit and params.max_tokens != 0):
            raise self._too_long(n, param)
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise bad_request(f"{max_tokens_param} is {params.max_tokens}, but the prompt's {n} tokens plus "
                              f"{params.max_tokens} exceed the model's maximum context length of {limit} tokens.",
                              max_tokens_param, "context_length_exceeded")
        try:
            params.verify_vocab(self.vocab_size)
        except ValueError as exc:
            raise invalid_params(exc, _SAMPLING_FIELDS) from None

    def submit(self, prefix: str, prompts: list[tuple[str | None, list[int]]], params, stream: bool,
               cache_salt: str | None) -> Submitted:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        inputs = [PromptInput(f"{rid}-{i}", text, ids) for i, (text, ids) in enumerate(prompts)]
        try:
            group = self.engine.add(inputs, params, stream, cache_salt)
        except CoreDead as exc:
            raise engine_error(exc) from None
        return Submitted(rid, group, {p.request_id: (i, p) for i, p in enumerate(inputs)}, int(time.time()))

    async def accepted(self, sub: Submitted) -> None:
        """Wait until the core queued the request (so a streaming response can still fail cleanly)."""
        try:
            await self.engine.wait_accepted(sub.group)
        except (RequestRejected, CoreDead) as exc:
            self.engine.abort(sub.group)
            raise engine_error(exc) from None
        except BaseException:
            self.engine.abort(sub.group)
            raise

    async def final_outputs(self, sub: Submitted) -> dict:
        """Engine request id -> final RequestOutput, for a non-streaming request."""
        finals = {}
        try:
            async for out in self.engine.results(sub.group):
                finals[out.request_id] = out
        except (RequestRejected, CoreDead) as exc:
            raise engine_error(exc) from None
        finally:
            if not sub.group.done:
                self.engine.abort(sub.group)
        return finals

    # -- logprobs -------------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, token_ids, positions, offset: int = 0) -> tuple[dict, int]:
        """The completions API's ``logprobs`` object for these tokens; also returns the next text offset.

        ``positions[i]`` is the ``{token_id: Logprob}`` dict of token ``i`` (or None: the first
        prompt token has no logprob). Its ``top_logprobs`` holds the chosen token and the top N.
        """
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, tid in enumerate(token_ids):
            pos = positions[i] if positions is not None and i < len(positions) else None
            chosen = pos.get(tid) if pos else None
            text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
                else self._token_text(tid)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(chosen.logprob) if chosen is not None else None)
            if pos:
                top: dict[str, float] = {}
                for t, lp in sorted(pos.items(), key=lambda kv: kv[1].rank or 0):
                    key = lp.decoded_token if lp.decoded_token is not None else self._token_text(t)
                    top.setdefault(key, _finite(lp.logprob))
                out["top_logprobs"].append(top)
            else:
                out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out, offset

    @staticmethod
    def prompt_logprobs(positions) -> list | None:
        """vLLM's ``prompt_logprobs`` field: per prompt token None or ``{id: {logprob, rank, decoded_token}}``."""
        if positions is None:
            return None
        return [None if pos is None else {
            str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in pos.items()} for pos in positions]

    def chat_logprobs(self, token_ids, positions, num_top: int) -> list[dict]:
        """The chat API's ``logprobs.content`` entries for these tokens."""
        content = []
        for tid, pos in zip(token_ids, positions or []):
            chosen = pos.get(tid) if pos else None
            text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
                else self._token_text(tid)
            tops = []
            for t, lp in sorted((pos or {}).items(), key=lambda kv: kv[1].rank or 0):
                if len(tops) < num_top and lp.rank is not None and lp.rank <= num_top:
                    tt = lp.decoded_token if lp.decoded_token is not None else self._token_text(t)
                    tops.append({"token": tt, "logprob": _finite(lp.logprob), "bytes": list(tt.encode())})
            content.append({"token": text, "logprob": _finite(chosen.logprob) if chosen else -9999.0,
                            "bytes": list(text.encode()), "top_logprobs": tops})
        return content


async def event_stream(srv: "Serving", sub: "Submitted", events):
    """Frame a streaming response: the endpoint's SSE ``events``, then ``[DONE]``.

    An engine failure mid-stream becomes an error event (then ``[DONE]``); a client that
    leaves early, or any other way out, aborts the request so its blocks are freed.
    """
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except (RequestRejected, CoreDead) as exc:
        yield engine_error(exc).sse()
        yield SSE_DONE
    finally:
        if not sub.group.done:
            srv.engine.abort(sub.group)


def engine_error(exc: Exception) -> APIError:
    """Map an engine-side failure to the HTTP error the client sees."""
    if isinstance(exc, RequestRejected):
        if exc.kind == "queue_full":
            return APIError(503, f"The server is overloaded: {exc}. Retry later.", None, "queue_full",
                            headers={"Retry-After": "1"})
        if exc.kind == "invalid":
            return APIError(400, str(exc))
        if exc.kind == "timeout":
            return APIError(504, f"The request timed out: {exc} (--request-timeout).", None, "request_timeout")
        return APIError(500, "internal server error")
    if isinstance(exc, CoreDead):
        return APIError(503, f"The engine is not running ({exc}). Retry later.", None, "engine_dead",
                        headers={"Retry-After": "5"})
    return APIError(500, "internal server error")
