"""Prometheus metrics for ``GET /metrics``.

Latency histograms (time to first token, inter-token latency, end-to-end latency) are
observed in the API process as outputs arrive. Engine gauges and counters (running and
waiting requests, KV-cache usage, prefix-cache hits, preemptions, token counters) are read
from the engine core's stats at scrape time. Names follow vLLM's, with ``tokenmill:``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)


class _EngineCollector:
    """Exposes the most recent :class:`~tokenmill.engine.engine_core.EngineStats`."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats = None

    def collect(self):
        s, labels = self.stats, [self.model_name]
        if s is None:
            return

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("num_requests_running", "Sequences being processed by the engine.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live sequences (1 = full).",
                    s.kv_usage)
        yield gauge("kv_cache_free_blocks", "KV-cache blocks allocatable now (free or evictable cached).",
                    s.num_free_blocks)
        yield gauge("kv_cache_blocks", "KV-cache blocks in the pool.", s.num_blocks)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up.",
                    s.prefix_hit_rate)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens)
        yield counter("num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.",
                      s.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("engine_steps", "Engine steps run.", s.steps)


class Metrics:
    """The server's metric registry (one per app, so tests can run several apps in a process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._engine = _EngineCollector(model_name)
        self.registry.register(self._engine)
        r, name = self.registry, model_name
        self.ttft = Histogram("tokenmill:time_to_first_token_seconds", "Time to first token.",
                              ["model_name"], buckets=_TTFT_BUCKETS, registry=r).labels(name)
        self.itl = Histogram("tokenmill:inter_token_latency_seconds", "Time between consecutive outputs of a request.",
                             ["model_name"], buckets=_ITL_BUCKETS, registry=r).labels(name)
        self.e2e = Histogram("tokenmill:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             ["model_name"], buckets=_E2E_BUCKETS, registry=r).labels(name)
        self._finished = Counter("tokenmill:request_success", "Finished sequences by finish reason.",
                                 ["model_name", "finished_reason"], registry=r)
        self.aborted = Counter("tokenmill:request_aborted", "Requests aborted before finishing (client gone).",
                               ["model_name"], registry=r).labels(name)
        self._errors = Counter("tokenmill:request_errors", "Requests answered with an error, by HTTP status.",
                               ["model_name", "status"], registry=r)
        self.model_name = name

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def render(self, stats) -> bytes:
        """The exposition text, with ``stats`` (or None if the core is unreachable) as engine values."""
        self._engine.stats = stats
        return generate_latest(self.registry)
