"""Helpers for the API tests: run ``python -m tokenmill serve`` on a free port and wait for it.

Not a conftest (pytest does not load it by itself); test modules import it and build
module-scoped fixtures with :func:`running_server`.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

#: Engine flags that keep a test server small and quick on two CPU cores.
SMALL_ENGINE = ["--device", "cpu", "--kv-cache-memory", "8MiB", "--max-model-len", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def core_pid(self) -> int:
        """The engine core process: the server's child running multiprocessing's spawn entry point."""
        for child in _children(self.proc.pid):
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                return child
        raise RuntimeError(f"no engine core child of {self.proc.pid}")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def launch_server(args: list[str], env: dict | None = None) -> Server:
    """Start ``python -m tokenmill serve ARGS`` on a free port; does not wait (see :func:`wait_healthy`)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tokenmill-serve-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "tokenmill", "serve", *args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_healthy(server: Server, timeout: float = 180.0) -> Server:
    """Wait (bounded) until ``GET /health`` answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{server.log()[-4000:]}")


def start_server(args: list[str], env: dict | None = None, timeout: float = 180.0) -> Server:
    """Start a server and wait until it is healthy."""
    return wait_healthy(launch_server(args, env), timeout)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


@contextlib.contextmanager
def running_server(args: list[str], env: dict | None = None, while_starting=None):
    """A healthy server for the ``with`` block, stopped afterwards. ``while_starting()`` runs
    while the server loads (say, the offline LLM the test compares against); the block gets
    ``(server, its result)`` then, else just the server."""
    server = launch_server(args, env)
    try:
        extra = while_starting() if while_starting is not None else None
        wait_healthy(server)
        yield (server, extra) if while_starting is not None else server
    finally:
        stop_server(server)
        server.log_path.unlink(missing_ok=True)


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """``GET /metrics`` as ``{name: value}`` (labels dropped; sums over label sets)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


def assert_error(resp: httpx.Response, status: int, param: str | None = ...) -> dict:
    """The response is an OpenAI-shaped error with ``status`` (and ``param``, when given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not ...:
        assert err["param"] == param, err
    return err
