"""``tokenmill serve`` start-up: clear errors instead of hangs, the bundled default model,
and the HTTP layer's guards (500 without traceback, chunked oversized bodies) in-process."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
from api_conftest import SMALL_ENGINE, running_server

from tokenmill.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from tokenmill.testing.tiny_models import make_tiny_model


def _serve(args, timeout=180):
    return subprocess.run([sys.executable, "-m", "tokenmill", "serve", *args, "--port", "1"],
                          capture_output=True, text=True, timeout=timeout)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    proc = _serve([str(tmp_path / "nope")], timeout=60)
    assert proc.returncode == 2
    assert "is not a local directory" in proc.stderr and "Traceback" not in proc.stderr


def test_core_startup_failure_surfaces(tmp_path):
    """Weights that do not load: the core process fails, the server says why and exits (no hang)."""
    src = make_tiny_model("llama")
    bad = tmp_path / "broken"
    shutil.copytree(src, bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(b"this is not a safetensors file")
    proc = _serve([str(bad), *SMALL_ENGINE])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "engine core failed to start" in proc.stderr


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(),
                    reason=f"the bundled default model is not in {DEFAULT_MODEL_DIR} yet")
def test_bundled_default_model_answers_chat():
    with running_server(["--device", "cpu", "--kv-cache-memory", "16MiB", "--max-model-len", "512"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
        r = client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is a list?"}])
        assert r.choices[0].message.content.strip()
        assert r.usage.completion_tokens >= 1


# -- the HTTP layer in-process ---------------------------------------------------------------------
def test_internal_error_does_not_leak():
    from fastapi import FastAPI

    from tokenmill.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail /etc/passwd")

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/boom")

    r = asyncio.run(main())
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["message"] == "internal server error" and "secret" not in r.text and "Traceback" not in r.text


def _gate(limit=100, key=None):
    from tokenmill.api.app import AppSettings, _Gate
    from tokenmill.api.metrics import Metrics

    seen = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return _Gate(app, AppSettings(("m",), "/m", key, limit), Metrics("m")), seen


def _call(gate, chunks, headers=(), path="/v1/completions"):
    sent = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(gate(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def test_gate_limits_chunked_bodies():
    gate, seen = _gate(limit=100)
    status, body = _call(gate, [b"x" * 60, b"y" * 60])  # no content-length: counted while reading
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _ = _call(gate, [b"x" * 50, b"y" * 50])
    assert status == 200 and seen["body"] == b"x" * 50 + b"y" * 50
    status, _ = _call(gate, [b"{}"], headers=[(b"content-length", b"1000")])
    assert status == 413


def test_gate_api_key():
    gate, _ = _gate(key="k1")
    assert _call(gate, [b"{}"])[0] == 401
    assert _call(gate, [b"{}"], headers=[(b"authorization", b"Bearer k2")])[0] == 401
    assert _call(gate, [b"{}"], headers=[(b"authorization", b"Bearer k1")])[0] == 200
    assert _call(gate, [b"{}"], headers=[(b"x-api-key", b"k1")])[0] == 200
    assert _call(gate, [b""], path="/health")[0] == 200
