"""The API process's view of the engine: submit requests, await their outputs.

The engine core runs in its own process (:class:`tokenmill.engine.core_process.CoreClient`).
A reader thread receives its update batches and hands them to the event loop, where the
:class:`~tokenmill.output_processor.OutputProcessor` detokenizes them and the outputs are
dispatched to per-request asyncio queues. Stop strings found here are sent back to the
core as ``finish`` commands; aborted requests as ``abort`` commands.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from tokenmill.engine.core_process import CoreClient, CoreDead
from tokenmill.output_processor import OutputProcessor
from tokenmill.outputs import RequestOutput

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The core refused a request: ``kind`` is ``queue_full``, ``invalid`` or ``internal``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class RequestTimedOut(RequestRejected):
    """The request ran past the server's ``--request-timeout``; it was aborted and its blocks freed."""

    def __init__(self, timeout: float):
        super().__init__("timeout", f"the request did not finish within the server's request timeout of "
                                    f"{timeout:g} s")


@dataclass
class PromptInput:
    """One prompt of a request, already tokenized."""

    request_id: str
    text: str | None
    token_ids: list[int]


@dataclass(eq=False)
class RequestGroup:
    """The engine requests behind one HTTP request (one per prompt), sharing one queue."""

    request_ids: list[str]
    stream: bool
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: set = field(default_factory=set)
    unaccepted: set = field(default_factory=set)
    accepted: asyncio.Future | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: dict = field(default_factory=dict)
    done: bool = False

    def __post_init__(self):
        self.pending = set(self.request_ids)
        self.unaccepted = set(self.request_ids)


class AsyncEngine:
    """Submits requests to the engine core process and streams back :class:`RequestOutput`.

    Call :meth:`start` from inside the running event loop before anything else.

    ``request_timeout`` (seconds, None: none) bounds each request from arrival to its last
    output; past it the request fails with :class:`RequestTimedOut` and is aborted.
    ``stall_timeout``: the core sends a message at least every second while its loop runs, so
    silence for this long means it is hung (:attr:`healthy` turns false). When the core dies,
    requests in flight fail with :class:`CoreDead`; ``restart()`` (a blocking callable returning
    a ready :class:`CoreClient`) then replaces it, at most ``max_restarts`` times over the
    server's life; after that, or if a restart fails, ``on_fatal(reason)`` is called (the server
    exits non-zero).
    """

    def __init__(self, core: CoreClient, tokenizer, metrics=None, *, request_timeout: float | None = None,
                 stall_timeout: float = 60.0, restart=None, max_restarts: int = 0, on_fatal=None):
        self.core = core
        self.info = core.info
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.processor = OutputProcessor(tokenizer)
        self.dead: str | None = None
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout
        self.num_restarts = 0
        self._restart, self._max_restarts, self._on_fatal = restart, max_restarts, on_fatal
        self._last_heard = time.monotonic()
        self._groups: dict[str, RequestGroup] = {}
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_reader()

    def _start_reader(self) -> None:
        self._last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._reader, args=(self.core,), name="tokenmill-core-reader",
                                        daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self.core.close()

    @property
    def alive(self) -> bool:
        """The core process runs and has not reported a crash (it may still be hung)."""
        return self.dead is None and self.core.alive

    @property
    def healthy(self) -> bool:
        return self.health_problem() is None

    def health_problem(self) -> str | None:
        """Why the engine cannot serve now (dead, restarting, hung), or None when it can."""
        if self.dead is not None:
            return f"engine core is not running: {self.dead}"
        if not self.core.alive:
            return "engine core is not running: the process exited"
        silent = time.monotonic() - self._last_heard
        if silent > self.stall_timeout:
            return f"engine core has made no progress for {silent:.0f} s (hung?)"
        return None

    def _reader(self, core: CoreClient) -> None:
        while True:
            try:
                msg = core.recv()
            except (EOFError, OSError):
                msg = ("fatal", "the engine core process exited")
            if core is not self.core:
                return  # a replaced core: its last words concern nobody
            try:
                self._loop.call_soon_threadsafe(self._on_message, msg)
            except RuntimeError:  # the loop is closed: we are shutting down
                return
            if msg[0] == "fatal":
                return

    # -- requests -------------------------------------------------------------------------------
    def add(self, prompts: list[PromptInput], params, stream: bool, cache_salt: str | None = None) -> RequestGroup:
        """Submit one engine request per prompt; consume the group with :meth:`results`."""
        if not self.alive:
            raise CoreDead(self.dead or "the engine core process is not running")
        if not self._groups:  # work starts now: silence before it was idleness, not a hang
            self._last_heard = time.monotonic()
        group = RequestGroup([p.request_id for p in prompts], stream, time.monotonic())
        group.accepted = self._loop.create_future()
        # The handler may be gone (client disconnected) when a rejection arrives.
        group.accepted.add_done_callback(lambda f: f.cancelled() or f.exception())
        for p in prompts:
            self.processor.add(p.request_id, p.text, p.token_ids, params, delta=stream)
            self._groups[p.request_id] = group
            group.num_tokens[p.request_id] = 0
            self.core.send(("add", p.request_id, p.token_ids, params, cache_salt))
        return group

    async def results(self, group: RequestGroup):
        """Yield the group's outputs (deltas when streaming, else each prompt's final output)
        until every prompt has finished. Raises RequestRejected (RequestTimedOut) or CoreDead."""
        await self._in_time(asyncio.shield(group.accepted), group)
        while group.pending or not group.queue.empty():
            item = await self._in_time(group.queue.get(), group)
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                group.pending.discard(item.request_id)
            yield item
        group.done = True

    async def wait_accepted(self, group: RequestGroup) -> None:
        """Return once the core has queued every prompt; raise if it refused one."""
        await self._in_time(asyncio.shield(group.accepted), group)

    async def _in_time(self, awaitable, group: RequestGroup):
        """Await ``awaitable`` within the group's request timeout (the caller aborts the group on failure)."""
        if self.request_timeout is None:
            return await awaitable
        left = group.arrival + self.request_timeout - time.monotonic()
        try:
            return await asyncio.wait_for(awaitable, max(left, 0.0))
        except asyncio.TimeoutError:
            raise RequestTimedOut(self.request_timeout) from None

    def abort(self, group: RequestGroup, count: bool = True) -> None:
        """Stop whatever is left of the group (client gone, error); its KV blocks are freed."""
        if count and group.pending and self.metrics is not None:
            self.metrics.aborted.inc()
        for rid in list(group.pending):
            self.processor.abort(rid)
            if self._groups.pop(rid, None) is not None and self.dead is None:
                self.core.send(("abort", rid))
        group.pending.clear()
        if not group.accepted.done():
            group.accepted.cancel()

    async def stats(self, timeout: float = 5.0):
        """The core's :class:`~tokenmill.engine.engine_core.EngineStats` (a fresh snapshot)."""
        if not self.alive:
            raise CoreDead(self.dead or "the engine core process is not running")
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._stats_waiters[token] = fut
        self.core.send(("stats", token))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._stats_waiters.pop(token, None)

    async def flush_cache(self, timeout: float = 10.0) -> int:
        """Drop the prefix cache's unreferenced blocks; returns how many were freed."""
        if not self.alive:
            raise CoreDead(self.dead or "the engine core process is not running")
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._stats_waiters[token] = fut
        self.core.send(("flush_cache", token))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._stats_waiters.pop(token, None)

    # -- dispatch (runs on the event loop) ------------------------------------------------------
    def _on_message(self, msg) -> None:
        self._last_heard = time.monotonic()
        kind = msg[0]
        if kind == "batch":
            _, updates, events = msg
            for ev in events:
                self._on_event(ev)
            if updates:
                self._on_updates(updates)
        elif kind == "fatal":
            self._on_dead(msg[1])
        else:
            log.error("unexpected message from the engine core: %r", kind)

    def _on_event(self, ev) -> None:
        if ev[0] == "accepted":
            group = self._groups.get(ev[1])
            if group is not None:
                group.unaccepted.discard(ev[1])
                if not group.unaccepted and not group.accepted.done():
                    group.accepted.set_result(None)
        elif ev[0] == "rejected":
            _, rid, kind, message = ev
            group = self._groups.pop(rid, None)
            if group is not None:
                group.pending.discard(rid)
                self.processor.abort(rid)
                err = RequestRejected(kind, message)
                if not group.accepted.done():
                    group.accepted.set_exception(err)
                else:
                    group.queue.put_nowait(err)
                self.abort(group, count=False)  # the request's other prompts, if any
        elif ev[0] in ("stats", "flushed"):
            fut = self._stats_waiters.get(ev[1])
            if fut is not None and not fut.done():
                fut.set_result(ev[2])

    def _on_updates(self, updates) -> None:
        outputs, stops = self.processor.process(updates)
        for rid, index, stop in stops:
            self.core.send(("finish", rid, index, stop))
        now = time.monotonic()
        for out in outputs:
            group = self._groups.get(out.request_id)
            if group is None:
                continue
            self._observe(group, out, now)
            if out.finished:
                del self._groups[out.request_id]
            if group.stream or out.finished:
                group.queue.put_nowait(out)

    def _observe(self, group: RequestGroup, out: RequestOutput, now: float) -> None:
        n = sum(len(c.token_ids) for c in out.outputs)
        new = n if group.stream else n - group.num_tokens[out.request_id]
        group.num_tokens[out.request_id] = n if not group.stream else group.num_tokens[out.request_id] + n
        m = self.metrics
        if new > 0 and m is not None:
            if group.first_token is None:
                m.ttft.observe(now - group.arrival)
            else:
                m.itl.observe(now - group.last_token)
        if new > 0:
            group.first_token = group.first_token or now
            group.last_token = now
        if out.finished and m is not None:
            for c in out.outputs:
                m.finished(c.finish_reason or "abort")
            if all(r not in self._groups or r == out.request_id for r in group.request_ids):
                m.e2e.observe(now - group.arrival)

    def _on_dead(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        log.error("engine core died: %s", reason)
        err = CoreDead(reason)
        for group in set(self._groups.values()):
            if not group.accepted.done():
                group.accepted.set_exception(err)
            else:
                group.queue.put_nowait(err)
        for rid in self._groups:
            self.processor.abort(rid)
        self._groups.clear()
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_exception(err)
        if self._restart is not None and self.num_restarts < self._max_restarts:
            self.num_restarts += 1
            self.dead = f"restarting ({self.num_restarts} of at most {self._max_restarts}) after: {reason}"
            self._restarting = asyncio.ensure_future(self._restart_core())
        else:
            self._give_up(reason)

    async def _restart_core(self) -> None:
        old = self.core
        try:
            await self._loop.run_in_executor(None, old.close)
            core = await self._loop.run_in_executor(None, self._restart)
        except Exception as exc:
            log.error("engine core restart failed: %s", exc)
            self.dead = f"restart failed: {exc}"
            return self._give_up(self.dead)
        self.core, self.info = core, core.info
        self.dead = None
        self._start_reader()
        log.warning("engine core restarted (%d of at most %d restarts)", self.num_restarts, self._max_restarts)

    def _give_up(self, reason: str) -> None:
        if self._on_fatal is not None:
            log.error("engine core is gone for good (%s); stopping the server", reason)
            self._on_fatal(reason)
