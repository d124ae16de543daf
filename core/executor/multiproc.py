"""Tensor parallelism on one machine: rank 0 here, one worker process per other rank.

Workers are plain subprocesses (``python -m tokenmill.executor.worker``), so this works
from inside the daemonic engine-core process too. Each has a control channel back to
rank 0 (an authenticated local socket, never a collective, so an idle engine cannot time
a worker out); the collectives of the forward go through ``torch.distributed`` with the
platform's backend, bounded by ``distributed_timeout``.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener

from tokenmill.executor.interface import Executor, RankDied

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RemoteRanks:
    """The control channels of ranks 1..N-1: send one call to all, then collect every reply."""

    def __init__(self, conns: list, describe):
        self.conns = conns
        self.describe = describe  # rank -> text for error messages (exit code, node)
        self.dead: str | None = None

    def send(self, *msg) -> None:
        data = pickle.dumps(msg)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                self._fail(f"tensor-parallel rank {rank} is gone ({self.describe(rank)}): {exc}")

    def collect(self, timeout: float) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            try:
                if not conn.poll(timeout):
                    self._fail(f"tensor-parallel rank {rank} did not answer within {timeout:.0f} s "
                               f"({self.describe(rank)})")
                status, detail = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError) as exc:
                self._fail(f"tensor-parallel rank {rank} is gone ({self.describe(rank)}): {exc!r}")
            if status != "ok":
                self._fail(detail)

    def _fail(self, why: str):
        self.dead = self.dead or why
        raise RankDied(why)


class MultiprocExecutor(Executor):
    """``tensor_parallel_size`` ranks on this machine: rank 0 in this process, the rest as subprocesses."""

    def __init__(self, config, plugin_manager=None):
        from tokenmill.executor.worker import Worker

        size = config.parallel.tensor_parallel_size
        self.timeout = config.parallel.distributed_timeout
        self.procs: list[subprocess.Popen] = []
        authkey = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        env = dict(os.environ, TOKENMILL_WORKER_AUTHKEY=authkey.hex())
        # ranks on one host share its cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // size)))
        host, port = listener.address
        try:
            for rank in range(1, size):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tokenmill.executor.worker", f"{host}:{port}", str(rank)], env=env))
            conns = [None] * (size - 1)
            for _ in range(size - 1):
                rank, conn = self._accept(listener)
                conns[rank - 1] = conn
            self.remote = RemoteRanks(conns, self._describe)
            for conn in conns:
                conn.send_bytes(pickle.dumps((config, size, init_method)))
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            self.worker = Worker(config, 0, size, init_method, plugin_manager=plugin_manager)
            self.remote.collect(self.timeout)
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()
        self.driver = self.worker.runner
        log.info("executor: %d tensor-parallel ranks (workers pid %s), backend %s", size,
                 [p.pid for p in self.procs], self.worker.platform.dist_backend)

    def _accept(self, listener):
        """The next worker's connection and rank; a worker that dies at start-up is reported, not waited for."""
        got: list = []

        def accept():
            try:
                conn = listener.accept()
                got.append((pickle.loads(conn.recv_bytes()), conn))
            except Exception as exc:  # noqa: BLE001 - reported below
                got.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            dead = [f"rank {r} exited with code {p.poll()}" for r, p in enumerate(self.procs, 1) if p.poll() is not None]
            if dead and thread.is_alive():
                raise RankDied(f"tensor-parallel workers did not start: {'; '.join(dead)}")
        if not got or isinstance(got[0], Exception):
            raise RankDied(f"tensor-parallel workers did not connect within {self.timeout:.0f} s"
                           + (f": {got[0]}" if got else ""))
        return got[0]

    def _describe(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        code = proc.poll()
        return f"pid {proc.pid}, " + ("still running" if code is None else f"exit code {code}")

    def check_health(self) -> None:
        if self.remote.dead:
            raise RankDied(self.remote.dead)
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                self.remote._fail(f"tensor-parallel rank {rank} died ({self._describe(rank)})")

    def _all(self, method: str, *args):
        self.check_health()
        self.remote.send(method, *args)
        try:
            out = getattr(self.worker, method)(*args)
        except RuntimeError as exc:  # a collective failed: a peer died or timed out
            self.check_health()
            self.remote._fail(f"tensor-parallel step failed on rank 0: {exc}")
        self.remote.collect(self.timeout)
        return out

    def shutdown(self) -> None:
        remote = getattr(self, "remote", None)
        if remote is not None and not remote.dead:
            try:
                remote.send("stop")
            except RankDied:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()

