"""Decode steps captured once per batch-size bucket and replayed (platforms declaring ``graphs``).

A decode step (every sequence computes one token) does the same device work for every
batch of the same size; only the values in its inputs change. On a platform whose
``capabilities.graphs`` is true, the model runner captures that work once per batch-size
bucket through :meth:`tokenmill.platform.Platform.capture_graph` and replays it: the core
never names a vendor API. The discipline, which the recording graphs of the example
plugin exercise on the CPU:

* static inputs: one set of device buffers sized for the largest bucket (token ids,
  positions, slots, context lengths, block tables of ``max_model_len``'s width and the
  query offsets ``0..B``); a graph of size ``B`` reads their first ``B`` rows, always;
* pad to the bucket, copy in: each step writes its rows and resets every padded row
  (token 0, position 0, slot ``-1`` so nothing is written, context length 0, a zero
  block-table row), so no value of an earlier step survives into this one;
* replay, copy out: the graph refreshes its output logits ``[B, vocab]`` in place; the
  runner samples from the first rows before the next replay overwrites them.

The host fields of the captured metadata are fixed: query lengths all 1, ``max_query_len``
1, ``max_seq_len`` the model's context, ``seq_lens_cpu`` None. Only attention backends that
declare ``graph_capturable`` are captured; steps with prefill chunks, prompt logprobs or
pooling, batches above the largest bucket, tensor parallelism and ``--enforce-eager`` run
eagerly. A capture that fails turns graphs off for the engine's life, with a warning.
"""
from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from tokenmill.attention.interface import AttentionMetadata
from tokenmill.engine.input_batch import StepInputs

log = logging.getLogger(__name__)


def graphs_unavailable(platform, backend, config, tp_size: int) -> str | None:
    """Why decode steps run eagerly on this engine (None: they are captured)."""
    if not platform.capabilities.graphs:
        return f"platform {platform.name} does not declare graphs"
    if config.model.enforce_eager:
        return "--enforce-eager"
    if not getattr(backend, "graph_capturable", False):
        return f"attention backend {backend.name} is not graph-capturable"
    if tp_size > 1:
        return "tensor parallelism (collectives are not captured yet)"
    return None


class DecodeGraphs:
    """The captured decode graphs of one model runner, keyed by batch-size bucket."""

    def __init__(self, platform, model, kv_caches: list, sizes: tuple[int, ...], max_len: int, block_size: int,
                 device):
        self.platform = platform
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = tuple(sorted(set(sizes)))
        self.max_len = max_len
        self.block_size = block_size
        self.width = -(-max_len // block_size)
        top = self.sizes[-1]
        self.ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=device)
        self.tables = torch.zeros(top, self.width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, object] = {}
        self.pool = None
        #: Set when a capture failed: every later step runs eagerly.
        self.failed: str | None = None
        self.replays = 0

    def size_for(self, n: int) -> int | None:
        """The bucket a decode batch of ``n`` sequences is padded to (None: too large to capture)."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def _copy_in(self, size: int, step: StepInputs) -> None:
        n = len(step.input_ids)
        host = np.zeros((3, size), dtype=np.int64)
        host[0, :n], host[1, :n], host[2, :n], host[2, n:] = step.input_ids, step.positions, step.slots, -1
        host = torch.from_numpy(host)
        self.ids[:size].copy_(host[0], non_blocking=True)
        self.positions[:size].copy_(host[1], non_blocking=True)
        self.slots[:size].copy_(host[2], non_blocking=True)
        seq_lens = np.zeros(size, dtype=np.int32)
        seq_lens[:n] = step.seq_lens
        self.seq_lens[:size].copy_(torch.from_numpy(seq_lens), non_blocking=True)
        tables = torch.zeros(size, self.width, dtype=torch.int32)
        tables[:n, :step.block_tables.shape[1]] = step.block_tables
        self.tables[:size].copy_(tables, non_blocking=True)

    def _capture(self, size: int, backend):
        meta = AttentionMetadata(query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
                                 block_tables=self.tables[:size], slot_mapping=self.slots[:size], max_query_len=1,
                                 max_seq_len=self.max_len, query_lens_cpu=[1] * size, seq_lens_cpu=None,
                                 block_size=self.block_size)
        backend.prepare(meta)
        ids, positions, model, caches = self.ids[:size], self.positions[:size], self.model, self.kv_caches

        def step():
            return model.compute_logits(model.forward(ids, positions, caches, meta))

        if self.pool is None:
            self.pool = self.platform.graph_pool()
        graph = self.platform.capture_graph(step, pool=self.pool)
        log.info("decode graphs: captured batch size %d (%d of buckets %s)", size, len(self.graphs) + 1,
                 list(self.sizes))
        return graph

    def run_step(self, backend, items, states, step: StepInputs):
        """Logits of a step a graph can run, or None (it runs eagerly): a decode-only step, one token
        per sequence with only logits wanted from it. ``step`` holds the runner's host inputs."""
        if not all(item.num_new == 1 and not item.prompt_logprobs and not getattr(st.params, "pooling", None)
                   for item, st in zip(items, states)):
            return None
        return self.run(backend, step)

    @staticmethod
    def sample_logits(logits, rows: list[int]):
        """The rows of a replay's logits to sample from (rows are sequences; padded rows are ignored)."""
        n = len(rows)
        return logits[:n] if rows == list(range(n)) else logits[rows]

    def run(self, backend, step: StepInputs):
        """Logits ``[B, vocab]`` of a decode step (rows past the step's sequences are padding), or None
        when the step must run eagerly (too large, or capture failed). Valid until the next call."""
        size = self.size_for(len(step.input_ids))
        if size is None or self.failed is not None:
            return None
        self._copy_in(size, step)
        graph = self.graphs.get(size)
        if graph is None:
            try:
                graph = self.graphs[size] = self._capture(size, backend)
            except Exception as exc:  # noqa: BLE001 - the step still runs, eagerly
                self.failed = f"{type(exc).__name__}: {exc}"
                log.warning("decode graphs: capture of batch size %d failed (%s); running eagerly from now on",
                            size, self.failed)
                return None
        self.replays += 1
        return graph.replay()
