"""Request-supplied chat templates, rendered where a hostile one can be stopped.

A template is a program: ``{% for a in range(99999) %}{% for b in range(99999) %}`` runs for
hours and ``{{ 'ab ' * 10**9 }}`` allocates gigabytes, and a thread running jinja cannot be
interrupted. So a template sent with a request (only when the operator allows it,
``--trust-request-chat-template``) is rendered in a worker process, with HF's own sandboxed
renderer (the same output as ``apply_chat_template``), under three bounds: a deadline (the
worker is killed and replaced when it passes), an output-size cap, and an address-space
limit (a memory bomb fails there with MemoryError instead of taking the host down).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The template failed, ran past its deadline, or produced too much text."""


def _worker(conn, max_chars: int, memory_bytes: int) -> None:
    import resource

    from transformers.utils.chat_template_utils import render_jinja_template

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + memory_bytes, vm + memory_bytes))
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        template, messages, add_generation_prompt, continue_final_message, kwargs = job
        try:
            tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
            rendered, _ = render_jinja_template(
                conversations=[messages], tools=tools, documents=documents, chat_template=template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **kwargs)
            text = rendered[0]
            reply = ("ok", text) if len(text) <= max_chars else (
                "error", f"the chat template rendered {len(text)} characters, more than the limit of {max_chars}")
        except MemoryError:
            reply = ("error", "the chat template needed more memory than a render may use")
        except Exception as exc:  # jinja errors, raise_exception() in the template, bad kwargs
            reply = ("error", f"chat template failed to render: {exc}")
        del job
        conn.send(reply)


class _Worker:
    def __init__(self, ctx, max_chars: int, memory_bytes: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, max_chars, memory_bytes), daemon=True,
                                name="tokenmill-template")
        self.proc.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class TemplateSandbox:
    """A pool of ``workers`` renderer processes; :meth:`render` is async and bounded.

    ``timeout`` bounds one render (seconds), ``max_chars`` its output, ``memory_bytes`` what
    a render may allocate beyond the worker's baseline.
    """

    def __init__(self, special_tokens: dict, timeout: float = 5.0, max_chars: int = 16 << 20,
                 memory_bytes: int = 1 << 30, workers: int = 1, startup_timeout: float = 120.0):
        if timeout <= 0:
            raise ValueError(f"chat template timeout must be positive, got {timeout}")
        self.special_tokens = dict(special_tokens)
        self.timeout, self.max_chars, self.memory_bytes = timeout, max_chars, memory_bytes
        self.startup_timeout = startup_timeout
        self._ctx = mp.get_context("spawn")
        self._size = workers
        self._idle: asyncio.Queue | None = None
        self.killed = 0  # renders stopped at their deadline (a test and the logs read it)

    def start(self) -> None:
        """Start the workers (they import the renderer while the server finishes starting)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._size):
                self._idle.put_nowait(self._spawn())

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.max_chars, self.memory_bytes)

    async def _recv(self, conn, timeout: float):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
        return conn.recv()

    async def render(self, template: str, messages: list[dict], add_generation_prompt: bool,
                     continue_final_message: bool, kwargs: dict | None = None) -> str:
        self.start()
        worker = await self._idle.get()
        try:
            if not worker.ready:  # a fresh worker: its imports are not part of the deadline
                try:
                    await self._recv(worker.conn, self.startup_timeout)
                except (asyncio.TimeoutError, EOFError, OSError):
                    raise TemplateError("the chat template renderer did not start") from None
                worker.ready = True
            worker.conn.send((template, messages, add_generation_prompt, continue_final_message,
                              {**self.special_tokens, **(kwargs or {})}))
            start = time.monotonic()
            try:
                status, value = await self._recv(worker.conn, self.timeout)
            except asyncio.TimeoutError:
                self.killed += 1
                log.warning("a request's chat template ran past %.1fs; its renderer was killed", self.timeout)
                raise TemplateError(f"the chat template did not finish rendering within {self.timeout:g} s") from None
            except (EOFError, OSError):  # the worker died (killed by the OS, say)
                raise TemplateError("the chat template renderer failed") from None
            finally:
                if time.monotonic() - start >= self.timeout or not worker.proc.is_alive():
                    worker.kill()
                    worker = self._spawn()
        except BaseException:
            if worker.ready and worker.proc.is_alive():
                # Cancelled mid-render (client left): its reply would be read by the next job.
                worker.kill()
                worker = self._spawn()
            raise
        finally:
            if not worker.proc.is_alive():
                worker.kill()
                worker = self._spawn()
            self._idle.put_nowait(worker)
        if status != "ok":
            raise TemplateError(value)
        return value

    def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            self._idle.get_nowait().kill()
