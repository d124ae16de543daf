"""Paged attention through IPEX's CPU kernels (``ipex.llm.modules.PagedAttention``).

Cache layout: IPEX's CPU kernels read ``[num_blocks, num_kv_heads, block_size, head_size]``
per K and V (measured on IPEX 2.8: its docstring's ``[num_blocks, block_size, num_heads,
head_size]`` for ``reshape_and_cache`` is wrong, and a cache in that layout makes the
kernel write out of bounds), so a layer's cache is ``[2, num_blocks, kv_heads,
block_size, head_size]``; blocks stay on dimension 1, so the default ``copy_blocks``
serves. Per step:

* the new K/V go in with ``reshape_and_cache``; IPEX does not skip slot ``-1`` (it writes
  out of bounds), so those rows are dropped first;
* a step of decodes only is one ``single_query_cached_kv_attention`` call (window: the
  last ``window`` keys); any other step is one ``flash_attn_varlen_func`` call over the
  ragged batch (causal, aligned to each sequence's end; window: ``window - 1`` keys left).

Block-table entries past a sequence's own pages are replaced by block 0 (the contract
lets them be anything; IPEX must not be handed an out-of-range id).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata

from tokenmill_cpu.ipex import counted, load_ipex


@dataclass
class _Plan:
    """What every layer of one step shares."""

    slots: object  # int64 [W] cache slots to write
    write_rows: object  # rows of k/v to write (None: all rows, in order)
    decode_only: bool
    tables: object  # int32 [S, nb], entries past each sequence's pages set to 0
    seq_lens: object  # int32 [S]
    cu_q: object  # int32 [S + 1]
    cu_kv: object  # int32 [S + 1]
    max_q: int
    max_kv: int


def plan(meta: AttentionMetadata) -> _Plan:
    import torch

    bs = meta.block_size
    slots = meta.slot_mapping.to(torch.int64)
    write_rows = None
    valid = slots >= 0
    if not bool(valid.all()):
        write_rows = valid.nonzero().flatten()
        slots = slots.index_select(0, write_rows)
    seq_lens = meta.seq_lens.to(torch.int32)
    nb = max(1, max(-(-n // bs) for n in meta.seq_lens_cpu))
    tables = meta.block_tables[:, :nb].to(torch.int32)
    needed = (seq_lens.to(torch.int64) + bs - 1) // bs
    tables = torch.where(torch.arange(nb)[None, :] < needed[:, None], tables, 0).contiguous()
    cu_kv = torch.zeros(len(meta.seq_lens_cpu) + 1, dtype=torch.int32)
    torch.cumsum(seq_lens, 0, out=cu_kv[1:])
    decode_only = all(n == 1 for n in meta.query_lens_cpu)
    return _Plan(slots, write_rows, decode_only, tables, seq_lens, meta.query_start_loc.to(torch.int32), cu_kv,
                 meta.max_query_len, meta.max_seq_len)


class IpexPagedAttentionBase(AttentionBackend):
    """IPEX's paged attention on the cpu platform; :func:`ipex_attention_backend` binds the ops."""

    name = "cpu-ipex"
    device_types = ("cpu",)
    priority = 20  # above the plugin's own CpuAttention: IPEX serves when it is usable
    head_sizes = None
    dtypes = ("float32", "bfloat16", "float16")
    sliding_window = True
    gqa = True
    #: IPEX's ``reshape_and_cache``, ``single_query_cached_kv_attention`` and ``flash_attn_varlen_func``.
    write = decode_attention = varlen_attention = None

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    @classmethod
    def prepare(cls, meta: AttentionMetadata) -> None:
        meta.extra = plan(meta)

    def __init__(self, spec):
        super().__init__(spec)
        import torch

        from tokenmill_cpu.threads import configure_threads

        configure_threads()
        group = spec.num_heads // spec.num_kv_heads
        self.head_mapping = (torch.arange(spec.num_heads, dtype=torch.int32) // group).contiguous()

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        import torch

        p = meta.extra if isinstance(meta.extra, _Plan) else plan(meta)
        meta.extra = p
        spec = self.spec
        num_tokens, h, hk, d = q.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_size
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        k = k.reshape(num_tokens, hk, d)
        v = v.reshape(num_tokens, hk, d)
        if p.write_rows is not None:
            k, v = k.index_select(0, p.write_rows), v.index_select(0, p.write_rows)
        if p.slots.numel():
            type(self).write(k.to(key_cache.dtype).contiguous(), v.to(value_cache.dtype).contiguous(),
                             key_cache, value_cache, p.slots)
        q = q.reshape(num_tokens, h, d).contiguous()
        out = torch.empty(num_tokens, h, d, dtype=q.dtype)
        window = spec.sliding_window
        if p.decode_only:
            type(self).decode_attention(out, q, key_cache, value_cache, self.head_mapping, self.scale, p.tables,
                                        p.seq_lens, meta.block_size, p.max_kv, None, window or -1)
        else:
            type(self).varlen_attention(out, q, key_cache, value_cache, p.cu_q, p.cu_kv, p.max_q, p.max_kv,
                                        self.scale, True, p.tables, None, (window - 1) if window else -1,
                                        0 if window else -1)
        return out.view(num_tokens, h * d)


def ipex_attention_backend(ipex) -> type:
    """An :class:`IpexPagedAttentionBase` subclass calling ``ipex``'s PagedAttention ops (counted)."""
    ops = ipex.llm.modules.PagedAttention
    return type("IpexPagedAttention", (IpexPagedAttentionBase,), {
        "__doc__": IpexPagedAttentionBase.__doc__, "__module__": __name__,
        "write": staticmethod(counted("reshape_and_cache", ops.reshape_and_cache)),
        "decode_attention": staticmethod(counted("single_query_cached_kv_attention",
                                                 ops.single_query_cached_kv_attention)),
        "varlen_attention": staticmethod(counted("flash_attn_varlen_func", ops.flash_attn_varlen_func)),
    })


def ipex_attention_backends(ipex=None) -> list[type]:
    """``[the IPEX backend]`` when IPEX is usable (``ipex``: the module; default :func:`load_ipex`), else ``[]``."""
    ipex = ipex if ipex is not None else load_ipex()
    return [ipex_attention_backend(ipex)] if ipex is not None else []
