"""Data parallelism behind SGLang's real router: ``tokenmill router --data-parallel-size 2`` on 127.0.0.1.

Two replicas of the bundled model and ``sglang-router`` in front: the router registers each
replica from our worker endpoints, forwards completions and streaming chat, keeps a long shared
prefix on one replica (cache_aware), and drops a replica that dies while the other keeps serving.
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

import httpx
import openai
import pytest

from api_conftest import SMALL_ENGINE, _children, free_port, metrics, wait_for

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
    def __init__(self, extra: list[str] = ()):
        self.port, base = free_port(), _two_free_ports()
        self.log = Path(tempfile.mkstemp(prefix="tokenmill-router-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "tokenmill", "router", "--data-parallel-size", "2", "--port", str(self.port),
               "--worker-base-port", str(base), *SMALL_ENGINE, "--log-level", "warning",
               "--health-check-interval-secs", "1", "--health-failure-threshold", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = [f"http://127.0.0.1:{base + i}" for i in range(2)]

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


def test_a_dead_replica_is_dropped_and_the_other_keeps_serving():
    d = Deployment(["--router-policy", "round_robin"])
    try:
        d.wait()
        os.kill(d.replica_pid(1), signal.SIGKILL)

        def dropped():
            ws = {w["url"]: w for w in httpx.get(d.url + "/workers").json()["workers"]}
            return d.workers[1] not in ws or not ws[d.workers[1]]["is_healthy"]

        wait_for(dropped, timeout=30, interval=0.5)
        for i in range(4):  # round robin would send every other request to the dead one
            r = httpx.post(d.url + "/v1/completions", json={
                "model": "tokenmill-default", "prompt": f"x = {i}", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
        wait_for(lambda: "replica 1" in d.log.read_text() and "exited" in d.log.read_text(), timeout=10)
        assert d.proc.poll() is None  # the deployment keeps running on the survivor
    finally:
        d.stop()


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
