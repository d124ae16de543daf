"""A deadline and an output cap for the operator's own chat template, rendered in a thread.

The model's template is trusted code, but what it renders grows with the request: a template
that loops over every message's characters, or repeats the system prompt per message, can
take seconds and build a prompt far larger than the request's body. A request's own
template runs in a killable worker process (``tokenmill.api.template_sandbox``); the
operator's renders in a worker thread, which nothing can kill, so the render is made to stop
itself. HF compiles each template string once (cached) into a jinja environment; that
environment gets three checks, active only inside :func:`budget` on the rendering thread:

- every function or method call and every attribute or item lookup the template makes
  (``environment.call`` / ``getattr`` / ``getitem``, through which sandboxed jinja routes
  them) checks the deadline, so any loop that does something stops at it;
- the output is gathered chunk by chunk (``environment.concat``), checking the deadline and
  the running length, so a render stops at the cap instead of after building it all.

Outside a budget (offline ``LLM.chat``, other threads) the checks are a no-op. What this
cannot stop: a loop whose body makes no call and no lookup (``{% for i in range(10**5) %}
{% endfor %}``, bounded by jinja's own 100000-item range cap), or one huge C-level
operation (``'a' * 10**9``): the operator's template does not do those on purpose.
"""
from __future__ import annotations

import contextlib
import threading
import time

from transformers.utils.chat_template_utils import _compile_jinja_template

_local = threading.local()
#: Output chunks between two deadline checks while gathering (a check costs a clock read).
_CHECK_EVERY = 64


class TemplateBudgetExceeded(ValueError):
    """The chat template ran past its deadline or rendered more than the cap allows."""


class _Budget:
    def __init__(self, timeout: float, max_chars: int):
        self.timeout, self.max_chars = timeout, max_chars
        self.deadline = time.monotonic() + timeout

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"the chat template did not finish rendering within {self.timeout:g} s")

    def too_long(self, n: int) -> TemplateBudgetExceeded:
        return TemplateBudgetExceeded(f"the chat template rendered more than {self.max_chars} characters "
                                      f"(at least {n}), the limit")


def _tick() -> None:
    b = getattr(_local, "budget", None)
    if b is not None:
        b.check_time()


def _guard(env) -> None:
    """Route ``env``'s calls, lookups and output gathering through the budget checks (once per env)."""
    if getattr(env, "_tokenmill_budget", False):
        return
    call, getattr_, getitem, concat = env.call, env.getattr, env.getitem, env.concat

    def guarded_call(__context, __obj, *args, **kwargs):
        _tick()
        return call(__context, __obj, *args, **kwargs)

    def guarded_getattr(obj, attribute):
        _tick()
        return getattr_(obj, attribute)

    def guarded_getitem(obj, argument):
        _tick()
        return getitem(obj, argument)

    def guarded_concat(chunks):
        b = getattr(_local, "budget", None)
        if b is None:
            return concat(chunks)
        out, n = [], 0
        for i, chunk in enumerate(chunks):
            n += len(chunk)
            if n > b.max_chars:
                raise b.too_long(n)
            if i % _CHECK_EVERY == 0:
                b.check_time()
            out.append(chunk)
        return "".join(out)

    env.call, env.getattr, env.getitem, env.concat = guarded_call, guarded_getattr, guarded_getitem, guarded_concat
    env._tokenmill_budget = True


@contextlib.contextmanager
def budget(template: str, timeout: float, max_chars: int):
    """Within the block, this thread's renders of ``template`` stop after ``timeout`` seconds or
    past ``max_chars`` characters of output with :class:`TemplateBudgetExceeded`."""
    if not timeout > 0 or max_chars < 0:
        raise ValueError(f"a template budget needs a positive timeout and a cap >= 0, got {timeout}, {max_chars}")
    _guard(_compile_jinja_template(template).environment)
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget(timeout, max_chars)
    try:
        yield
    finally:
        _local.budget = previous
