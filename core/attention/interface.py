"""The attention interface: one call serves a ragged batch of prefill chunks and decode tokens.

Layout of a batch of ``S`` sequences and ``T = sum(query_lens)`` new tokens:

* ``q``: ``[T, num_heads, head_size]``; ``k``, ``v``: ``[T, num_kv_heads, head_size]``,
  the new tokens of every sequence, concatenated in sequence order.
* ``meta.query_start_loc``: int32 ``[S + 1]``; sequence ``i``'s new tokens are rows
  ``query_start_loc[i]:query_start_loc[i+1]``.
* ``meta.seq_lens``: int32 ``[S]``; the context length of sequence ``i`` *including* its
  new tokens. Its new tokens sit at positions ``seq_lens[i] - query_len_i ... seq_lens[i] - 1``.
* ``meta.block_tables``: int32 ``[S, max_blocks]``; row ``i`` lists the KV pages of
  sequence ``i`` in order (padding past the sequence's blocks is arbitrary).
* ``meta.slot_mapping``: int64 ``[T]``; the flat cache slot (``block * block_size + offset``)
  where each new token's K and V are written; ``-1`` means do not write.

On a platform with static shapes the model runner pads the batch to shape buckets
(:mod:`tokenmill.engine.buckets`): padding sequences have query length 0 and context
length 0 (a block-table row of zeros), and padding tokens come after every real
sequence's rows (``query_start_loc[S]`` onward) with slot ``-1``; their output rows are
ignored, but must not disturb the real rows.

The backend writes the new K/V into the cache, then computes causal attention of each
new token over its sequence's context (all earlier tokens plus itself), restricted to the
last ``sliding_window`` positions when that is set. GQA: query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)``. The output is ``[T, num_heads * head_size]`` in q's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar


class UnsupportedAttention(ValueError):
    """A backend cannot serve the requested configuration; the message says why."""


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every layer (see the module docstring for shapes).

    The ``*_cpu`` lists mirror the tensors on the host so that backends can plan without
    a device synchronisation. ``num_prefill_tokens`` is informational.
    """

    query_start_loc: Any
    seq_lens: Any
    block_tables: Any
    slot_mapping: Any
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    #: Free-form per-backend state built once per step by ``AttentionBackend.prepare``.
    extra: Any = None

    @classmethod
    def from_lists(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                   slot_mapping: list[int], block_size: int, device) -> "AttentionMetadata":
        """Build the step's tensors on ``device`` from host lists (block tables are padded here)."""
        import torch

        width = max(len(t) for t in block_tables)
        qsl = [0, *accumulate(query_lens)]
        return cls(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                                      device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=block_size)

    def split_decodes(self) -> tuple[list[int], list[int], list[tuple[int, int, int, int]]]:
        """Sort the batch for planning: ``(decode_seqs, decode_rows, prefills)``.

        ``decode_seqs`` are the sequences with one new token and ``decode_rows`` that token's
        row; ``prefills`` holds ``(seq, first_row, last_row + 1, seq_len)`` for the others.
        """
        decode_seqs, decode_rows, prefills = [], [], []
        row = 0
        for i, (qlen, slen) in enumerate(zip(self.query_lens_cpu, self.seq_lens_cpu)):
            if qlen == 1:
                decode_seqs.append(i)
                decode_rows.append(row)
            elif qlen > 1:
                prefills.append((i, row, row + qlen, slen))
            row += qlen
        return decode_seqs, decode_rows, prefills


@dataclass(frozen=True)
class AttentionSpec:
    """The attention configuration a model asks for (per layer)."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: str  # torch dtype name: "float32", "float16", "bfloat16"
    sliding_window: int | None = None
    scale: float | None = None  # defaults to head_size ** -0.5


class AttentionBackend:
    """A paged attention implementation for one or more platforms.

    Subclasses set the class attributes and implement :meth:`forward`. The default
    :meth:`supports` checks the declared head sizes, dtypes, sliding window and GQA;
    override it for finer rules. One instance serves one layer.
    """

    name: ClassVar[str] = ""
    device_types: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0
    head_sizes: ClassVar[tuple[int, ...] | None] = None  # None: any
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
    sliding_window: ClassVar[bool] = True
    gqa: ClassVar[bool] = True
    #: The dimension of :meth:`kv_cache_shape` that indexes blocks (the default copies use it).
    block_dim: ClassVar[int] = 1
    #: Whether a decode step through :meth:`forward` may be captured into a device graph and
    #: replayed (see :mod:`tokenmill.engine.graphs`): given the metadata of a decode step of
    #: the captured batch size (every query length 1, ``max_query_len`` 1, ``seq_lens_cpu``
    #: None), forward reads the step's values only from the metadata's device tensors,
    #: with no host synchronisation and no shape that depends on them, and writes nothing
    #: for slot ``-1``. State :meth:`prepare` builds is built once, at capture.
    graph_capturable: ClassVar[bool] = False

    @classmethod
    def supports(cls, spec: AttentionSpec) -> str | None:
        """Return ``None`` when ``spec`` is supported, else the reason it is not."""
        if cls.head_sizes is not None and spec.head_size not in cls.head_sizes:
            return f"{cls.name}: head size {spec.head_size} not in {list(cls.head_sizes)}"
        if spec.dtype not in cls.dtypes:
            return f"{cls.name}: dtype {spec.dtype} not in {list(cls.dtypes)}"
        if spec.sliding_window and not cls.sliding_window:
            return f"{cls.name}: sliding window not supported"
        if spec.num_heads % spec.num_kv_heads:
            return f"{cls.name}: num_heads {spec.num_heads} not a multiple of num_kv_heads {spec.num_kv_heads}"
        if spec.num_kv_heads != spec.num_heads and not cls.gqa:
            return f"{cls.name}: grouped-query attention not supported"
        return None

    @classmethod
    def check(cls, spec: AttentionSpec) -> None:
        """Raise :class:`UnsupportedAttention` with the reason when ``spec`` is unsupported."""
        reason = cls.supports(spec)
        if reason:
            raise UnsupportedAttention(reason)

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor; the default is ``[2, blocks, block_size, kv_heads, head_size]``."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def copy_blocks(cls, kv_caches: list, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages ``src -> dst`` in every layer (copy-on-write of forked sequences).

        The default matches the default :meth:`kv_cache_shape` (blocks on dimension 1).
        """
        if not copies:
            return
        import torch

        src = torch.tensor([c[0] for c in copies], device=kv_caches[0].device)
        dst = torch.tensor([c[1] for c in copies], device=kv_caches[0].device)
        for cache in kv_caches:
            cache[:, dst] = cache[:, src]

    @classmethod
    def swap_blocks(cls, src_caches: list, dst_caches: list, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages ``src_caches[l][block s] -> dst_caches[l][block d]`` for ``(s, d)`` in ``pairs``.

        The model runner calls it to swap blocks between the device KV cache and its host
        swap space (both of :meth:`kv_cache_shape`'s layout, with their own block counts),
        in either direction. The default indexes blocks on :attr:`block_dim`, copies runs of
        consecutive blocks as one slice, and does not wait: a page-locked host side makes
        the copy asynchronous, ordered with the device's later work on the same stream.
        """
        if not pairs:
            return
        runs: list[list[int]] = []  # [src, dst, length]
        for s, d in pairs:
            if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
                runs[-1][2] += 1
            else:
                runs.append([s, d, 1])
        dim = cls.block_dim
        for src, dst in zip(src_caches, dst_caches):
            for s, d, n in runs:
                dst.narrow(dim, d, n).copy_(src.narrow(dim, s, n), non_blocking=True)

    @classmethod
    def prepare(cls, meta: AttentionMetadata) -> None:
        """Build per-step state once for all layers (stored in ``meta.extra``); optional."""

    def __init__(self, spec: AttentionSpec):
        self.check(spec)
        self.spec = spec
        self.scale = spec.scale if spec.scale is not None else spec.head_size ** -0.5

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        """Write ``k``/``v`` into ``kv_cache`` at ``meta.slot_mapping`` and return attention output ``[T, H*D]``."""
        raise NotImplementedError
