"""The attention backend around the shared Triton kernels (Triton is imported on first use)."""
from __future__ import annotations

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata


class TritonAttention(AttentionBackend):
    """Ragged paged attention in two Triton launches per layer: K/V cache write, then attention.

    Serves prefill chunks and decode tokens of any mix in one kernel; GQA/MQA, sliding
    window, float32/float16/bfloat16, any page size. Subclassed per platform by
    :func:`tokenmill.kernels.triton.attention_backend`.
    """

    name = "triton"
    device_types: tuple[str, ...] = ()
    priority = 10
    head_sizes = (32, 64, 80, 96, 112, 128, 160, 192, 256)
    dtypes = ("float32", "float16", "bfloat16")
    sliding_window = True
    gqa = True
    # Launch sizes depend only on the batch shape; the tile plan is built from query_lens_cpu
    # (all 1 in a captured decode step) on the first layer and reused from meta.extra.
    graph_capturable = True

    @classmethod
    def prepare(cls, meta: AttentionMetadata) -> None:
        meta.extra = {}

    def _tiles(self, meta: AttentionMetadata, block_q: int, device):
        from tokenmill.kernels.triton.paged_attention import plan_tiles

        if not isinstance(meta.extra, dict):
            meta.extra = {}
        key = ("triton_tiles", block_q)
        tiles = meta.extra.get(key)
        if tiles is None:
            tiles = meta.extra[key] = plan_tiles(meta.query_lens_cpu, block_q, device)
        return tiles

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        import torch

        from tokenmill.kernels.triton.paged_attention import block_m_for, paged_attention, write_kv_cache

        spec = self.spec
        num_tokens = q.shape[0]
        d = spec.head_size
        q = q.view(num_tokens, spec.num_heads, d)
        k = k.view(num_tokens, spec.num_kv_heads, d)
        v = v.view(num_tokens, spec.num_kv_heads, d)
        write_kv_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        block_q, _ = block_m_for(spec.num_heads // spec.num_kv_heads, meta.max_query_len)
        out = torch.empty_like(q)
        paged_attention(q, kv_cache[0], kv_cache[1], out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                        self._tiles(meta, block_q, q.device), block_q, self.scale, spec.sliding_window)
        return out.view(num_tokens, spec.num_heads * d)
