"""The FastAPI application: routes, the gate (API key, body size), errors, disconnects."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.api.async_engine import AsyncEngine
from tokenmill.api.chat import create_chat_completion, render
from tokenmill.api.completions import create_completion
from tokenmill.api.embeddings import EmbeddingRequest, create_embedding, hidden_size, resolve_pooling
from tokenmill.api.errors import SafeJSONResponse, bad_request, error_body, install_error_handlers
from tokenmill.api.metrics import CONTENT_TYPE, Metrics
from tokenmill.api.models import add_model_routes
from tokenmill.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tokenmill.api.responses import ResponsesRequest, create_response
from tokenmill.api.serving import Serving
from tokenmill.api.store import CompletionStore, add_store_routes
from tokenmill.api.tool_calls import prepare, template_messages
from tokenmill.api.worker_info import ROUTER_OPEN_PATHS, add_worker_routes
from tokenmill.version import __version__

log = logging.getLogger(__name__)

#: Paths answered without an API key (load balancers and scrapers hold no key).
OPEN_PATHS = frozenset({"/health", "/metrics"}) | ROUTER_OPEN_PATHS


@dataclass(frozen=True)
class AppSettings:
    """Server options that shape the HTTP layer."""

    model_names: tuple[str, ...]
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    tool_call_parser: str | None = None
    max_n: int = 128
    #: SQLite database of stored chat completions (``--store PATH``); None: storing is off.
    store_path: str | None = None
    #: How ``/v1/embeddings`` pools hidden states: ``auto``, ``last`` or ``mean`` (see api/embeddings.py).
    embedding_pooling: str = "auto"
    trust_request_chat_template: bool = False
    chat_template_timeout: float = 5.0


class _Gate:
    """Pure-ASGI middleware: API key check, request body limit, error counting.

    The body is read here (up to the limit) and replayed to the app, so an oversized body is
    refused with 413 before anything parses it, chunked or not. Later ``receive`` calls go
    to the server, so disconnects are still seen.
    """

    def __init__(self, app, settings: AppSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self._key = settings.api_key.encode() if settings.api_key else None

    async def _reply(self, send, status: int, message: str, code: str, headers=()):
        body = json.dumps(error_body(status, message, None, code)).encode()
        self.metrics.error(status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(token, self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self._key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS" \
                and not self._authorized(headers):
            return await self._reply(send, 401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                                     "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        limit = self.settings.max_body_bytes
        too_large = f"The request body is larger than the limit of {limit} bytes."
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reply(send, 413, too_large, "request_too_large")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await self._reply(send, 413, too_large, "request_too_large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            async def receive_again(_first=[replay]):
                return _first.pop() if _first else await receive()

            inner_receive = receive_again
        else:
            inner_receive = receive

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, inner_receive, counting_send)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, coro):
    """Run ``coro``; if the client goes away first, cancel it (its ``finally`` aborts the
    engine request, freeing its KV blocks). Streaming responses notice disconnects themselves."""
    handler = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handler.cancel()
        raise
    finally:
        watcher.cancel()
    if handler.done():
        return handler.result()
    handler.cancel()
    try:
        await handler
    except asyncio.CancelledError:
        pass
    except Exception:
        log.debug("handler failed after the client disconnected", exc_info=True)
    return Response(status_code=499)


def build_app(engine: AsyncEngine, settings: AppSettings, metrics: Metrics | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``; the engine core's lifetime is the caller's."""
    metrics = metrics or Metrics(settings.model_names[0])
    engine.metrics = metrics
    srv = Serving(engine, engine.tokenizer, list(settings.model_names), settings.model_path,
                  settings.tool_call_parser, max_n=settings.max_n,
                  trust_request_chat_template=settings.trust_request_chat_template,
                  chat_template_timeout=settings.chat_template_timeout, max_prompt_chars=settings.max_body_bytes)
    srv.store = CompletionStore(settings.store_path) if settings.store_path else None
    pooling, embedding_size = resolve_pooling(settings.embedding_pooling, settings.model_path), \
        hidden_size(settings.model_path)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        if srv.sandbox is not None:
            srv.sandbox.start()
        try:
            yield
        finally:
            srv.close()
            if srv.store is not None:
                srv.store.close()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.state.serving = srv
    app.state.metrics = metrics
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        problem = engine.health_problem()
        if problem is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(503, problem, None, "engine_dead" if not engine.alive else "engine_stalled"),
                            503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    add_model_routes(app, srv, settings.model_names, started)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await cancel_on_disconnect(request, create_completion(srv, req))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await cancel_on_disconnect(request, create_chat_completion(srv, req))

    add_store_routes(app, srv.store)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        return await cancel_on_disconnect(request, create_embedding(srv, req, pooling, embedding_size))

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, request: Request):
        return await cancel_on_disconnect(request, create_response(srv, req))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        srv.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt and messages.", "prompt")
        if req.prompt is not None:
            ids = await srv.encode(req.prompt, req.add_special_tokens is not False, "prompt")
        else:
            chat = ChatCompletionRequest(messages=req.messages, tools=req.tools)
            try:
                conversation = chat.conversation()
            except ValueError as exc:
                raise bad_request(str(exc), "messages") from None
            calling = prepare(chat, srv.tool_parser)
            _, ids = await render(srv, template_messages(conversation), req.add_generation_prompt,
                                  req.continue_final_message, bool(req.add_special_tokens), None,
                                  {"tools": calling.tools} if calling is not None and calling.tools else None)
        return {"count": len(ids), "max_model_len": srv.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        srv.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < srv.vocab_size]
        if bad:
            raise bad_request(f"token id(s) {bad[:5]} are outside the vocabulary (size {srv.vocab_size}).", "tokens")
        return {"prompt": await srv.decode(req.tokens)}

    add_worker_routes(app, engine, settings.model_names, settings.model_path)

    @app.get("/metrics")
    async def prometheus():
        try:
            stats = await engine.stats(timeout=5.0)
        except Exception:  # a dead or stuck core: still expose the API-side metrics
            stats = None
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    return _Gate(app, settings, metrics)


__all__ = ["AppSettings", "build_app", "cancel_on_disconnect"]
