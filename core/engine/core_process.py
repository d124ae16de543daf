"""The engine core in its own process, and the client the server talks to it with.

Under ``tokenmill serve`` the :class:`~tokenmill.engine.engine_core.EngineCore` (scheduler and
model runner) runs in a child process started with the ``spawn`` context, so HTTP,
tokenization and detokenization in the API process never steal time from the step loop.
The two talk over two one-way ``multiprocessing`` pipes.

API -> core commands (tuples)::

    ("add", request_id, prompt_token_ids, params, cache_salt)
    ("abort", request_id)
    ("finish", request_id, index, stop)      # a stop string matched in the API's detokenizer
    ("stats", token)
    ("flush_cache", token)                   # drop unreferenced prefix-cache blocks
    ("shutdown",)

core -> API messages::

    ("ready", CoreInfo)                      # once, after the model and KV cache are loaded
    ("startup_error", message, traceback)    # once, instead of "ready"; then the process exits
    ("batch", updates, events)               # after each loop turn that has something to say
    ("fatal", message)                       # the loop crashed; the process exits

``events`` holds ``("accepted", rid)``, ``("rejected", rid, kind, message)`` with ``kind`` in
``queue_full``/``invalid``/``internal``, ``("stats", token, EngineStats)`` and
``("flushed", token, num_blocks_freed)`` and ``("heartbeat",)`` (sent when nothing else was for
:data:`HEARTBEAT_S`, idle or busy: a step loop that stops making progress falls silent).
The core blocks on its command pipe while it has no work (no busy spin) and exits when the
API process goes away (its command pipe reaches EOF).
"""
from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreInfo:
    """What the API process needs to know about the loaded engine."""

    pid: int
    platform: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    num_kv_tokens: int
    attention_backend: str
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    tensor_parallel_size: int = 1
    #: The ``--structured-output-backend`` of requests that name none.
    structured_output_backend: str = "auto"


class CoreStartupError(RuntimeError):
    """The engine core process failed to start (bad model path, out of memory, ...)."""


class CoreDead(RuntimeError):
    """The engine core process is gone; no request can be served."""


class WireLogprobs(NamedTuple):
    """A torch-free copy of :class:`tokenmill.sampler.TokenLogprobs`, so that unpickling an
    update in the API process does not import torch (same attribute names)."""

    token_id: int
    logprob: float
    rank: int
    top: list


def _wire(lp):
    return None if lp is None else WireLogprobs(lp.token_id, lp.logprob, lp.rank, list(lp.top))


#: The core sends at least one message this often (a ``heartbeat`` event when it has nothing
#: else to say), so the API can tell a live step loop from a hung one.
HEARTBEAT_S = 1.0


# -- the child side -------------------------------------------------------------------------------
def _core_main(config, cmd_conn, out_conn, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from tokenmill.engine.engine_core import EngineCore
        from tokenmill.engine.warmup import warm_up

        engine = EngineCore(config)
        t0 = time.perf_counter()
        steps = warm_up(engine)
        log.info("engine: warmed up in %d steps, %.0f ms", steps, (time.perf_counter() - t0) * 1e3)
        info = CoreInfo(os.getpid(), engine.platform.name, engine.max_model_len, engine.vocab_size,
                        engine.kv.num_blocks, engine.kv.block_size, engine.num_kv_tokens,
                        engine.runner.backend.name, config.scheduler.max_num_seqs,
                        config.scheduler.max_num_batched_tokens, config.parallel.tensor_parallel_size,
                        config.guided.backend)
    except BaseException as exc:  # report anything, even SystemExit, rather than die silently
        out_conn.send(("startup_error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    # This process holds one engine for its life: what start-up built (model, tokenizer, plugins)
    # never becomes garbage, so the cyclic collector need not rescan it on every collection.
    gc.collect()
    gc.freeze()
    out_conn.send(("ready", info))
    try:
        _loop(engine, cmd_conn, out_conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        engine.shutdown()
        return  # the API process is gone
    except BaseException as exc:
        log.exception("engine core loop crashed")
        try:
            out_conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        engine.shutdown()
        raise SystemExit(1)
    engine.shutdown()
    # Asked to shut down: nothing to save, so skip the slow interpreter teardown (torch threads...).
    from multiprocessing import util

    util._exit_function()  # release multiprocessing resources (tqdm's lock semaphore) as a normal exit would
    logging.shutdown()
    os._exit(0)


def _loop(engine, cmd_conn, out_conn) -> None:
    from tokenmill.engine.engine_core import QueueFull
    from tokenmill.executor import RankDied

    def handle(cmd, events) -> bool:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, salt = cmd
            try:
                engine.add_request(rid, ids, params, cache_salt=salt)
                events.append(("accepted", rid))
            except QueueFull as exc:
                events.append(("rejected", rid, "queue_full", str(exc)))
            except ValueError as exc:
                events.append(("rejected", rid, "invalid", str(exc)))
            except Exception as exc:
                log.exception("add_request %s failed", rid)
                events.append(("rejected", rid, "internal", f"{type(exc).__name__}: {exc}"))
        elif kind == "abort":
            engine.abort(cmd[1])
        elif kind == "finish":
            engine.finish_seq(cmd[1], cmd[2], cmd[3])
        elif kind == "stats":
            events.append(("stats", cmd[1], engine.stats()))
        elif kind == "flush_cache":
            before = engine.kv.num_cached_blocks
            engine.kv.reset_prefix_cache()
            events.append(("flushed", cmd[1], before - engine.kv.num_cached_blocks))
        elif kind == "shutdown":
            return False
        else:
            log.error("unknown command %r", kind)
        return True

    last_sent = time.monotonic()
    while True:
        events: list = []
        if not engine.has_unfinished():  # idle: block (waking once a HEARTBEAT_S to say it is alive)
            if cmd_conn.poll(HEARTBEAT_S):
                if not handle(cmd_conn.recv(), events):
                    return
            else:
                events.append(("heartbeat",))
        while cmd_conn.poll():
            if not handle(cmd_conn.recv(), events):
                return
        updates = []
        if engine.has_unfinished():
            steps = engine.stats().steps
            try:
                updates = engine.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("engine step failed; failing every request in flight")
                message = f"engine step failed: {type(exc).__name__}: {exc}"
                events.extend(("rejected", rid, "internal", message) for rid in engine.abort_all())
                updates = []
                if isinstance(exc, RankDied):  # the engine cannot step again: fail in flight, then die
                    out_conn.send(("batch", [], events))
                    raise
            events.extend(("rejected", rid, "invalid", message) for rid, message in engine.pop_rejected())
            for u in updates:
                u.new_logprobs = [_wire(lp) for lp in u.new_logprobs]
                if u.prompt_logprobs is not None:
                    u.prompt_logprobs = [_wire(lp) for lp in u.prompt_logprobs]
            if engine.stats().steps == steps:
                # Work exists but nothing could be scheduled: wait for a command, not spin.
                cmd_conn.poll(0.01)
        if not (updates or events) and time.monotonic() - last_sent >= HEARTBEAT_S:
            events.append(("heartbeat",))  # busy without results to report (long prefills)
        if updates or events:
            out_conn.send(("batch", updates, events))
            last_sent = time.monotonic()


# -- the API side ---------------------------------------------------------------------------------
class CoreClient:
    """Starts the engine core process for ``config`` and waits until it is ready
    (with ``wait=False``, until :meth:`wait_ready` is called).

    Raises :class:`CoreStartupError` with the child's error if it fails to load, dies, or
    does not become ready within ``startup_timeout`` seconds (None: no limit, but a dead
    child is always noticed). ``send`` never blocks the caller (a thread writes to the pipe);
    ``recv`` blocks and raises ``EOFError`` once the core is gone.
    """

    def __init__(self, config, startup_timeout: float | None = None, log_level: int | None = None,
                 wait: bool = True):
        ctx = mp.get_context("spawn")
        cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._out_r, out_w = ctx.Pipe(duplex=False)
        level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
        self.process = ctx.Process(target=_core_main, args=(config, cmd_r, out_w, level),
                                   name="tokenmill-core", daemon=True)
        # The API process shares the host's cores with the core's OpenMP workers, which wait for
        # work between a step's parallel regions. Measured on 2 cores, llama20m, 8 streaming clients
        # (out tok/s, idle host / host with two busy loops): unbounded spinning (ACTIVE) 649-671 /
        # starves the rest, libgomp's default 300k spins 634 / 99, sleeping at once (PASSIVE) 491 /
        # 258, a 10k spin 598 / 239: so a short spin, unless the user chose a policy. The spawned
        # child reads the variables when its OpenMP runtime starts.
        if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
            os.environ["GOMP_SPINCOUNT"] = "10000"
        self.process.start()
        # Close our copies of the child's ends, so that its death shows up as EOF here.
        cmd_r.close()
        out_w.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.info: CoreInfo | None = None
        self._startup_timeout = startup_timeout
        if wait:
            self.wait_ready()

    def wait_ready(self) -> CoreInfo:
        """Block until the core has loaded (``wait=False`` lets the caller work meanwhile)."""
        if self.info is not None:
            return self.info
        try:
            self.info = self._wait_ready(self._startup_timeout)
        except BaseException:
            self._kill()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="tokenmill-core-sender", daemon=True)
        self._sender.start()
        return self.info

    def _wait_ready(self, timeout: float | None) -> CoreInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._out_r.poll(0.2):
                try:
                    msg = self._out_r.recv()
                except EOFError:
                    self.process.join(5)
                    raise CoreStartupError(f"the engine core process exited during startup "
                                           f"(exit code {self.process.exitcode}); see its log above") from None
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "startup_error":
                    log.debug("engine core startup traceback:\n%s", msg[2])
                    raise CoreStartupError(f"the engine core failed to start: {msg[1]}")
                raise CoreStartupError(f"unexpected message from the engine core during startup: {msg[0]!r}")
            if not self.process.is_alive():
                raise CoreStartupError(f"the engine core process exited during startup "
                                       f"(exit code {self.process.exitcode}); see its log above")
            if deadline is not None and time.monotonic() > deadline:
                raise CoreStartupError(f"the engine core did not become ready within {timeout:.0f} s")

    def _send_loop(self) -> None:
        while True:
            cmd = self._outbox.get()
            if cmd is None:
                return
            try:
                self._cmd_w.send(cmd)
            except OSError:
                return  # the core is gone; the reader side reports it

    def send(self, cmd: tuple) -> None:
        if not self._closed:
            self._outbox.put(cmd)

    def recv(self):
        return self._out_r.recv()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the core to stop, then make sure it has (terminate, kill)."""
        if self._closed:
            return
        if self.info is None:  # still loading: nothing to shut down gracefully
            return self._kill()
        self.send(("shutdown",))
        self._closed = True
        self._outbox.put(None)
        self.process.join(timeout)
        self._kill()

    def _kill(self) -> None:
        self._closed = True
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3)
        for conn in (self._cmd_w, self._out_r):
            try:
                conn.close()
            except OSError:
                pass
