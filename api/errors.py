"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through :class:`APIError` or one of the handlers
installed by :func:`install_error_handlers`; a 500 never carries a traceback. Responses are
encoded by :class:`SafeJSONResponse`, which cannot fail on text that is not valid Unicode.
"""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """A JSON response whose encoding never fails: a lone surrogate that reached a message
    (a client's text echoed back) is written as its ``\\uXXXX`` escape instead of raising."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable", 504: "timeout_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict:
    """OpenAI's error object; ``code`` is a string or null, as OpenAI's spec has it (never the status)."""
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "error"),
                      "param": param, "code": None if code is None else str(code)}}


class APIError(Exception):
    """An error to return to the client as-is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return SafeJSONResponse(error_body(self.status, self.message, self.param, self.code), self.status,
                            headers=self.headers)

    def sse(self) -> str:
        return f"data: {json.dumps(error_body(self.status, self.message, self.param, self.code))}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


_PARAM_RE = re.compile(r"^([a-z_]+)\b")


def invalid_params(exc: ValueError, known: set[str]) -> APIError:
    """A 400 for a ValueError from SamplingParams/engine checks; ``param`` is the field the
    message starts with (they all do: "top_p must be in (0, 1], got 2.0.")."""
    msg = str(exc)
    m = _PARAM_RE.match(msg)
    param = m.group(1) if m and m.group(1) in known else None
    return APIError(400, msg, param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "lone_surrogate":
        return first["msg"], first["ctx"]["param"]
    # Unions report one error per member; name the field once.
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return f"{where}: {first.get('msg')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return SafeJSONResponse(error_body(400, message, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return SafeJSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return SafeJSONResponse(error_body(500, "internal server error"), 500)
