"""Data parallelism behind SGLang's real router: ``tokenmill router --data-parallel-size 2`` on 127.0.0.1.

Two replicas of the bundled model and ``sglang-router`` in front, started once for the module:
the router registers each replica from our worker endpoints, forwards completions and streaming
chat, and keeps a long shared prefix on one replica (cache_aware). A second router
(``tokenmill router --worker-urls``) in front of one of those replicas and a third of its own
drops that third one when it dies, while the other keeps serving.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from api_conftest import SMALL_ENGINE, _children, free_port, metrics, start_server, stop_server, wait_for

pytest.importorskip("sglang_router", reason="needs tokenmill[router] (sglang-router)")


def _two_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        with contextlib.suppress(OSError):
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
    raise RuntimeError("no two consecutive free ports")


class Deployment:
    """``tokenmill router`` in a subprocess: two new replicas, or the router alone before ``worker_urls``."""

    def __init__(self, extra: list[str] = (), worker_urls: list[str] | None = None):
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(prefix="tokenmill-router-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "tokenmill", "router", "--port", str(self.port), "--log-level", "warning",
               "--health-check-interval-secs", "1", "--health-failure-threshold", "1", *extra]
        if worker_urls:
            cmd += ["--worker-urls", *worker_urls]
            self.workers = list(worker_urls)
        else:
            base = _two_free_ports()
            cmd += ["--data-parallel-size", "2", "--worker-base-port", str(base), *SMALL_ENGINE]
            self.workers = [f"http://127.0.0.1:{base + i}" for i in range(2)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            if "behind sglang-router" in self.log.read_text():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"not up within {timeout}s:\n{self.log.read_text()[-4000:]}")

    def replica_pid(self, i: int) -> int:
        port = self.workers[i].rsplit(":", 1)[1]
        for pid in _children(self.proc.pid):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in cmd and port.encode() in cmd:
                return pid
        raise RuntimeError(f"no replica on port {port}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def dep():
    d = Deployment()
    try:
        yield d.wait()
    finally:
        d.stop()


def test_router_registers_replicas_from_our_worker_endpoints(dep):
    for url in dep.workers:
        info = httpx.get(url + "/get_server_info").json()
        assert info["model_id"] == "tokenmill-default" and info["dp_size"] == 1
        assert info["max_total_num_tokens"] > 0 and info["page_size"] == 16
        model = httpx.get(url + "/get_model_info").json()
        assert model["is_generation"] is True and model["architectures"] == ["LlamaForCausalLM"]
        # open without a key, so they name the model as /v1/models does, never its place on disk
        served = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert model["model_path"] == model["tokenizer_path"] == info["model_path"] == served == "tokenmill-default"
        assert "default-model" not in httpx.get(url + "/get_model_info").text + httpx.get(url + "/get_server_info").text
        load = httpx.get(url + "/get_load").json()
        assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    workers = httpx.get(dep.url + "/workers").json()["workers"]
    assert sorted(w["url"] for w in workers) == dep.workers
    # the router read the model's name and facts from our /get_server_info and /get_model_info
    assert all(w["model_id"] == "tokenmill-default" and w["is_healthy"] for w in workers), workers
    assert all(w["metadata"]["model_type"] == "llama" for w in workers), workers


def test_completions_and_streaming_chat_through_the_router(dep):
    client = openai.OpenAI(base_url=dep.url + "/v1", api_key="none")
    out = client.completions.create(model="tokenmill-default", prompt="def add(a, b):", max_tokens=6, temperature=0)
    direct = httpx.post(dep.workers[0] + "/v1/completions", json={
        "model": "tokenmill-default", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0}).json()
    assert out.choices[0].text == direct["choices"][0]["text"] and out.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tokenmill-default", max_tokens=5, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "What is a list?"}]))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_cache_aware_keeps_a_shared_prefix_on_one_replica(dep):
    before = [metrics(u) for u in dep.workers]
    prefix = "You are a careful assistant for the Python standard library. " * 4
    for i in range(4):
        r = httpx.post(dep.url + "/v1/completions", json={
            "model": "tokenmill-default", "prompt": prefix + f"Question {i}: what does len do?", "max_tokens": 2},
            timeout=60)
        assert r.status_code == 200, r.text
    after = [metrics(u) for u in dep.workers]
    got = [a["tokenmill:prompt_tokens_total"] - b["tokenmill:prompt_tokens_total"] for a, b in zip(after, before)]
    hits = sum(a["tokenmill:prefix_cache_hits_total"] - b["tokenmill:prefix_cache_hits_total"]
               for a, b in zip(after, before))
    assert sorted(got)[0] == 0 and sorted(got)[1] > 0, got  # every request went to the same replica
    assert hits >= 3 * 16, hits  # and the later three reused the first one's prefix blocks


def test_flush_cache_fans_out_to_every_replica(dep):
    r = httpx.post(dep.url + "/flush_cache", timeout=30)
    assert r.status_code == 200 and r.json()["workers_flushed"] == 2, r.text
    for url in dep.workers:
        assert metrics(url)["tokenmill:kv_cache_free_blocks"] == metrics(url)["tokenmill:kv_cache_blocks"]


def test_a_dead_replica_is_dropped_and_the_other_keeps_serving(dep):
    # a replica of its own to kill, beside one of the module's, behind a second router of its own
    third = start_server([*SMALL_ENGINE], env={"OMP_NUM_THREADS": "1"})
    core = third.core_pid()
    d = Deployment(["--router-policy", "round_robin"], worker_urls=[dep.workers[0], third.url])
    try:
        d.wait()
        os.kill(third.proc.pid, signal.SIGKILL)

        def dropped():
            ws = {w["url"]: w for w in httpx.get(d.url + "/workers").json()["workers"]}
            return third.url not in ws or not ws[third.url]["is_healthy"]

        wait_for(dropped, timeout=30, interval=0.5)
        for i in range(4):  # round robin would send every other request to the dead one
            r = httpx.post(d.url + "/v1/completions", json={
                "model": "tokenmill-default", "prompt": f"x = {i}", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
        assert d.proc.poll() is None  # the router keeps running on the survivor
    finally:
        d.stop()
        stop_server(third)
        with contextlib.suppress(ProcessLookupError):  # its engine core, orphaned by the SIGKILL
            os.kill(core, signal.SIGKILL)
        third.log_path.unlink(missing_ok=True)


def test_deployment_reports_each_replica_that_exits_and_stops_when_none_is_left(capsys):
    from tokenmill.commands.router import Deployment as Launched

    def proc(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code])

    d = Launched(SimpleNamespace(data_parallel_size=2, worker_base_port=None, port=free_port(),
                                 host="127.0.0.1", worker_urls=None))
    d.router = proc("import time; time.sleep(60)")
    d.replicas = [proc("raise SystemExit(3)"), proc("import time; time.sleep(1.5)")]
    d.worker_urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    try:
        assert d.watch() == 1  # once both replicas are gone
    finally:
        d.stop()
    err = capsys.readouterr().err
    assert "replica 0 (http://127.0.0.1:1) exited with code 3; the router drops it, 1 keep serving" in err, err
    assert "replica 1 (http://127.0.0.1:2) exited with code 0" in err and "every replica has exited" in err, err


def test_data_parallel_without_the_router_installed_says_how_to_install(tmp_path):
    # a sitecustomize that hides sglang_router, as if the extra were not installed
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'sglang_router':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "tokenmill", "serve", "--data-parallel-size", "2"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install 'tokenmill[router]'" in r.stderr, r.stderr
