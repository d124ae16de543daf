"""The reference paged attention backend against dense attention computed head by head."""
from __future__ import annotations

import math
import random

import pytest
import torch

from tokenmill.attention.interface import AttentionMetadata, AttentionSpec, UnsupportedAttention
from tokenmill.attention.reference import ReferenceAttention



# (tokens already cached, new tokens) per sequence: a fresh prefill, decodes at block
# boundaries and mid-block, a prefill chunk on top of a cached context, a single-token prompt.
SEQS = [(0, 7), (10, 1), (33, 5), (16, 1), (0, 1), (47, 1), (5, 12)]


def _dense(q, k, v, start, scale, window):
    """q: [Lq, H, D] at positions start..; k, v: [L, Hk, D] (the whole context) -> [Lq, H, D]."""
    lq, h, d = q.shape
    g = h // k.shape[1]
    out = torch.empty(lq, h, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // g].double(), v[:, head // g].double()
        for i in range(lq):
            p = start + i
            lo = 0 if window is None else max(0, p - window + 1)
            scores = (kh[lo:p + 1] @ q[i, head].double()) * scale
            out[i, head] = torch.softmax(scores, 0) @ vh[lo:p + 1]
    return out


def _run(num_heads, num_kv_heads, head_size, window, dtype, block_size, seqs=SEQS, garbage_padding=True,
         prepare=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    spec = AttentionSpec(num_heads, num_kv_heads, head_size, str(dtype).removeprefix("torch."), window)
    backend = ReferenceAttention(spec)
    nblocks_per_seq = [math.ceil((c + n) / block_size) for c, n in seqs]
    num_blocks = sum(nblocks_per_seq) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)  # non-contiguous, out-of-order pages
    cache = torch.zeros(ReferenceAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size), dtype=dtype)
    tables, full_k, full_v, qs, ks, vs, slots = [], [], [], [], [], [], []
    for (ctx_len, n), nb in zip(seqs, nblocks_per_seq):
        blocks = [pool.pop() for _ in range(nb)]
        tables.append(blocks)
        k_all = torch.randn(ctx_len + n, num_kv_heads, head_size, generator=gen).to(dtype)
        v_all = torch.randn(ctx_len + n, num_kv_heads, head_size, generator=gen).to(dtype)
        for p in range(ctx_len):  # the context is already in the cache
            cache[0, blocks[p // block_size], p % block_size] = k_all[p]
            cache[1, blocks[p // block_size], p % block_size] = v_all[p]
        full_k.append(k_all)
        full_v.append(v_all)
        qs.append(torch.randn(n, num_heads, head_size, generator=gen).to(dtype))
        ks.append(k_all[ctx_len:])
        vs.append(v_all[ctx_len:])
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx_len, ctx_len + n)]
    width = max(len(t) for t in tables) + 2
    pad = 10 ** 6 if garbage_padding else 0  # padding past a sequence's pages is arbitrary
    table = torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.int32)
    qlens = [n for _, n in seqs]
    slens = [c + n for c, n in seqs]
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(query_start_loc=qsl, seq_lens=torch.tensor(slens, dtype=torch.int32),
                             block_tables=table, slot_mapping=torch.tensor(slots, dtype=torch.int64),
                             max_query_len=max(qlens), max_seq_len=max(slens), query_lens_cpu=qlens,
                             seq_lens_cpu=slens, block_size=block_size)
    if prepare:
        ReferenceAttention.prepare(meta)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = backend.forward(q, k, v, cache, meta)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    assert out.shape == (q.shape[0], num_heads * head_size) and out.dtype == dtype
    expect = torch.cat([_dense(qi, fk, fv, c, backend.scale, window)
                        for qi, fk, fv, (c, _) in zip(qs, full_k, full_v, seqs)])
    # Every token's K/V landed in its page.
    for t, (fk, fv) in zip(tables, zip(full_k, full_v)):
        for p in range(fk.shape[0]):
            assert torch.equal(cache[0, t[p // block_size], p % block_size], fk[p])
            assert torch.equal(cache[1, t[p // block_size], p % block_size], fv[p])
    return out.view(-1, num_heads, head_size), expect, backend, meta, cache


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_size", [4, 16])
def test_matches_dense_attention(heads, window, block_size):
    out, expect, *_ = _run(heads[0], heads[1], 32, window, torch.float32, block_size)
    torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_model_head_sizes(head_size):
    out, expect, *_ = _run(4, 2, head_size, None, torch.float32, 16)
    torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=2e-5)


def test_bfloat16_and_odd_head_size():
    out, expect, *_ = _run(4, 2, 24, 9, torch.bfloat16, 16)
    torch.testing.assert_close(out.double(), expect, atol=3e-2, rtol=3e-2)


def test_without_prepare_and_with_zero_padding():
    a, *_ = _run(4, 2, 16, None, torch.float32, 4, prepare=False, garbage_padding=False)
    b, *_ = _run(4, 2, 16, None, torch.float32, 4, prepare=True, garbage_padding=True)
    assert torch.equal(a, b)


def test_scale_from_spec():
    spec = AttentionSpec(2, 1, 16, "float32", scale=0.5)
    assert ReferenceAttention(spec).scale == 0.5
    assert ReferenceAttention(AttentionSpec(2, 1, 16, "float32")).scale == 16 ** -0.5


def test_slot_minus_one_is_not_written():
    block_size, hk, d = 4, 1, 8
    backend = ReferenceAttention(AttentionSpec(2, hk, d, "float32"))
    cache = torch.zeros(ReferenceAttention.kv_cache_shape(4, block_size, hk, d))
    # Two single-token prompts; the second is padding (slot -1) and must leave the cache alone.
    meta = AttentionMetadata(query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32),
                             seq_lens=torch.tensor([1, 1], dtype=torch.int32),
                             block_tables=torch.tensor([[2], [3]], dtype=torch.int32),
                             slot_mapping=torch.tensor([8, -1]), max_query_len=1, max_seq_len=1,
                             query_lens_cpu=[1, 1], seq_lens_cpu=[1, 1], block_size=block_size)
    k = torch.randn(2, hk, d)
    v = torch.randn(2, hk, d)
    q = torch.randn(2, 2, d)
    out = backend.forward(q, k, v, cache, meta)
    written = cache.view(2, -1, hk, d)
    assert torch.equal(written[0, 8], k[0]) and torch.equal(written[1, 8], v[0])
    written[:, 8] = 0
    assert not written.any()
    # One visible token: attention returns its value.
    torch.testing.assert_close(out[0].view(2, d), v[0].expand(2, d))


def test_declared_capabilities():
    assert ReferenceAttention.name == "reference"
    assert ReferenceAttention.device_types == ("*",)
    assert ReferenceAttention.priority == 0 and ReferenceAttention.head_sizes is None
    assert ReferenceAttention.kv_cache_shape(3, 16, 2, 64) == (2, 3, 16, 2, 64)
    for spec in (AttentionSpec(8, 1, 80, "bfloat16", 4096), AttentionSpec(8, 8, 256, "float16")):
        assert ReferenceAttention.supports(spec) is None
    with pytest.raises(UnsupportedAttention):
        ReferenceAttention(AttentionSpec(6, 4, 64, "float32"))
