"""Backend selection, the compile cache and off-loop compilation.

:class:`GuidedCompiler` is what the engine holds: it builds the registered backends for the
model's vocabulary (lazily, on its worker thread), picks one per spec (``auto``: xgrammar,
falling back to outlines for what xgrammar cannot compile), and compiles on a background
thread so the step loop never waits: :meth:`GuidedCompiler.submit` returns a
:class:`GrammarHandle` at once (validation, which for outlines-core builds an index, runs on the
worker too); the scheduler admits the request when ``handle.ready``. Compiled grammars are
cached by ``(requested backend, spec.key)`` (LRU), so a repeated schema compiles nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from tokenmill.guided.interface import CompiledGrammar, GuidedBackend, GuidedSpec, GuidedSpecError, VocabInfo
from tokenmill.guided.params import BACKEND_CHOICES

log = logging.getLogger(__name__)

#: What ``auto`` tries, in order.
AUTO_ORDER = ("xgrammar", "outlines")


def backend_classes(plugin_manager=None) -> dict[str, type[GuidedBackend]]:
    """Registered backend classes by name (later registrations of a name win: a plugin may override)."""
    from tokenmill.plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    return {cls.name: cls for cls in pm.guided_decoding_backends()}


#: (backend class, spec key, param) -> None (valid) or the error (message, param): validating a complex
#: spec can take long (outlines-core builds an index), and every request with that spec asks again.
_VALIDATED: OrderedDict[tuple, tuple[str, str | None] | None] = OrderedDict()
_VALIDATED_SIZE = 1024
_validated_lock = threading.Lock()


def _validate(cls: type[GuidedBackend], spec: GuidedSpec) -> None:
    key = (cls, spec.key, spec.param)  # the message names the parameter
    with _validated_lock:
        hit = key in _VALIDATED
        error = _VALIDATED.get(key)
        if hit:
            _VALIDATED.move_to_end(key)
    if not hit:
        try:
            cls.validate(spec)
            error = None
        except GuidedSpecError as exc:
            error = (str(exc), exc.param)
        with _validated_lock:
            _VALIDATED[key] = error
            while len(_VALIDATED) > _VALIDATED_SIZE:
                _VALIDATED.popitem(last=False)
    if error is not None:
        raise GuidedSpecError(*error)


def choose_backend(spec: GuidedSpec, requested: str, classes: dict[str, type[GuidedBackend]],
                   fallback: bool = True) -> str:
    """The backend that will compile ``spec``; raises :class:`GuidedSpecError` naming the parameter.

    ``requested`` is ``auto`` or a backend name. ``fallback=False`` (vLLM's ``disable_fallback``):
    ``auto`` tries only its first available backend. Validation only parses the spec (cheap, no
    tokenizer), so the API process runs this too and answers a bad spec with a 400.
    """
    if requested != "auto":
        cls = classes.get(requested)
        if cls is None:
            raise GuidedSpecError(f"unknown structured output backend {requested!r}; registered: "
                                  f"{', '.join(sorted(classes)) or 'none'}", "structured_outputs.backend")
        why = cls.available()
        if why:
            raise GuidedSpecError(f"structured output backend {requested!r} is unavailable: {why}",
                                  "structured_outputs.backend")
        _validate(cls, spec)
        return requested
    order = [n for n in AUTO_ORDER if n in classes] + sorted(n for n in classes if n not in AUTO_ORDER)
    first_error: GuidedSpecError | None = None
    for name in order:
        cls = classes[name]
        if cls.available():
            continue
        try:
            _validate(cls, spec)
            return name
        except GuidedSpecError as exc:
            if not fallback:
                rest = [n for n in order if n != name and not classes[n].available()]
                raise GuidedSpecError(f"{exc} (structured_outputs.disable_fallback is set, so auto does not fall back to "
                                      f"{' or '.join(rest) or 'another backend'})", exc.param) from None
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise GuidedSpecError("no structured output backend is available (install xgrammar or outlines-core)",
                          spec.param)


class GrammarHandle:
    """A compile in flight or done: ``ready`` once it finished; then ``grammar`` or ``error``."""

    __slots__ = ("future", "requested", "spec")

    def __init__(self, future: Future, requested: str, spec: GuidedSpec):
        self.future, self.requested, self.spec = future, requested, spec

    @property
    def ready(self) -> bool:
        return self.future.done()

    @property
    def error(self) -> str | None:
        exc = self.future.exception() if self.future.done() else None
        return None if exc is None else str(exc)

    @property
    def grammar(self) -> CompiledGrammar:
        return self.future.result()


class GuidedCompiler:
    """Compiles specs for one model's vocabulary, off the caller's thread, with a shared cache."""

    def __init__(self, vocab: VocabInfo, default_backend: str = "auto", plugin_manager=None,
                 cache_size: int = 256, classes: dict[str, type[GuidedBackend]] | None = None):
        if default_backend not in BACKEND_CHOICES:
            raise ValueError(f"structured_output_backend must be one of {', '.join(BACKEND_CHOICES)}, "
                             f"got {default_backend!r}")
        self.vocab = vocab
        self.default_backend = default_backend
        self.classes = classes if classes is not None else backend_classes(plugin_manager)
        self._backends: dict[str, GuidedBackend] = {}
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-guided")
        #: Seconds spent compiling (cache misses only), and counts, for benchmarks and metrics.
        self.compile_seconds = 0.0
        self.num_compiles = 0
        self.num_cache_hits = 0

    def backend(self, name: str) -> GuidedBackend:
        with self._lock:
            b = self._backends.get(name)
            if b is None:
                b = self._backends[name] = self.classes[name](self.vocab)
            return b

    def warm(self, fn) -> None:
        """Run ``fn()`` on the worker thread ahead of every compile submitted after it (per-vocabulary
        set-up the step loop would otherwise do on first use)."""
        self._pool.submit(fn)

    def resolve(self, spec: GuidedSpec, backend: str | None = None, fallback: bool = True) -> str:
        """The backend that will compile ``spec``; raises :class:`GuidedSpecError` naming the parameter.
        Validation parses the spec (outlines-core builds an index), so callers on the step loop leave
        it to :meth:`submit`; the API process and ``LLM`` call this first to fail fast."""
        return choose_backend(spec, backend or self.default_backend, self.classes, fallback)

    def submit(self, spec: GuidedSpec, backend: str | None = None, fallback: bool = True) -> GrammarHandle:
        """Start validating and compiling ``spec`` on the worker thread (or find it cached); never
        blocks. A bad spec fails the handle (``handle.error``) with the :class:`GuidedSpecError`.
        ``fallback``: see :func:`choose_backend`."""
        requested = backend or self.default_backend
        key = (requested, fallback or requested != "auto", spec.key)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return GrammarHandle(fut, requested, spec)
            fut = self._pool.submit(self._compile, requested, spec, fallback)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return GrammarHandle(fut, requested, spec)

    def compile(self, spec: GuidedSpec, backend: str | None = None, fallback: bool = True) -> CompiledGrammar:
        """Blocking :meth:`submit` (offline tools, tests, benchmarks)."""
        return self.submit(spec, backend, fallback).future.result()

    def _compile(self, requested: str, spec: GuidedSpec, fallback: bool) -> CompiledGrammar:
        name = self.resolve(spec, requested, fallback)
        t0 = time.perf_counter()
        grammar = self.backend(name).compile(spec)
        dt = time.perf_counter() - t0
        with self._lock:
            self.compile_seconds += dt
            self.num_compiles += 1
        log.debug("guided: compiled %s with %s in %.1f ms", spec.kind, name, dt * 1e3)
        return grammar

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
