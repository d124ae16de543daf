"""The cpu plugin's C kernels for RMSNorm and rotary: equal to the reference, on the engine's strided views."""
from __future__ import annotations

import pytest
import torch

from tokenmill.attention.reference import gqa_attention
from tokenmill.ops import reference
from tokenmill_cpu import native, native_attention, native_ops, ops

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"native kernels not built here: {native.status()}")


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])  # 300 x 512 crosses the threshold for OpenMP threads
def test_norms_match_reference(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    wide = torch.randn(tokens, 1024, generator=gen).to(dtype)
    x, res = wide[:, :512], torch.randn(tokens, 512, generator=gen).to(dtype)  # x: a strided view, as after a split
    w = torch.randn(512, generator=gen).to(dtype)
    torch.testing.assert_close(native_ops.rms_norm(lib, x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    got = native_ops.fused_add_rms_norm(lib, x, res, w, 1e-5)
    want = reference.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert x.equal(wide[:, :512])  # inputs untouched
    three = torch.randn(2, 3, 512, generator=gen).to(dtype)
    torch.testing.assert_close(ops.rms_norm(three, w, 1e-6), reference.rms_norm(three, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 400])
def test_rotary_matches_reference_on_qkv_views(tokens, dtype):
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 8 * 64 + 2 * 4 * 64, generator=gen).to(dtype)
    q, k = qkv[:, :512], qkv[:, 512:768]
    cache = torch.randn(4096, 64, generator=gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    got = native_ops.rotary_neox(lib, positions, q, k, cache, 64)
    want = reference.rotary_embedding(positions, q, k, cache, 64, True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    with pytest.raises(IndexError, match="out of range"):
        native_ops.rotary_neox(lib, torch.tensor([4096] * tokens), q, k, cache, 64)


def test_shapes_the_kernels_do_not_take_fall_back_to_torch():
    q, k = torch.randn(3, 128), torch.randn(3, 128)
    assert native_ops.rotary_neox(lib, torch.arange(3), q.half(), k.half(), torch.randn(16, 64), 64) is None
    partial = torch.randn(16, 32)  # rotary over half of each head: not the kernel's case
    assert native_ops.rotary_neox(lib, torch.arange(3), q, k, partial, 64) is None
    got = ops.rotary_embedding(torch.arange(3), q, k, partial, 64, True)
    want = reference.rotary_embedding(torch.arange(3), q, k, partial, 64, True)
    torch.testing.assert_close(got[0], want[0])
    assert native_ops.fused_add_rms_norm(lib, torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8), 1e-6) is None


def _paged_case(seqs, lens, heads, kv_heads, head, bs, dtype, gen):
    """A shuffled paged cache holding ``lens`` keys per sequence, and the same keys contiguous."""
    nbs = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(nbs) + 3, generator=gen)  # pages out of order, some unused
    k_cache = torch.randn(perm.numel(), bs, kv_heads, head, generator=gen).to(dtype)
    v_cache = torch.randn(perm.numel(), bs, kv_heads, head, generator=gen).to(dtype)
    tables = torch.zeros(seqs, max(nbs), dtype=torch.int32)
    used = 0
    for s, nb in enumerate(nbs):
        tables[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    q = torch.randn(seqs, heads, head, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head", [(8, 8, 64), (8, 4, 64), (6, 2, 64), (8, 2, 128), (8, 1, 32),
                                                 (4, 2, 80)])
@pytest.mark.parametrize("window", [0, 7])
def test_decode_attention_matches_reference(heads, kv_heads, head, window, dtype):
    """Both code paths of the decode kernel: AVX-512 (head size a multiple of 16, 1/2/4/8 query heads
    per KV head, where the CPU has it) and the generic loops (3 per KV head, head size 80)."""
    gen = torch.Generator().manual_seed(heads * 1000 + kv_heads * 10 + head + window)
    lens, bs = [1, 17, 40, 5, 33], 16
    q, k_cache, v_cache, tables = _paged_case(len(lens), lens, heads, kv_heads, head, bs, dtype, gen)
    out = torch.full_like(q, float("nan"))
    rows = torch.tensor([4, 0, 2, 1, 3])  # decode rows in any order
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    for threads in (1, 2):
        native_attention.paged_decode(lib, q, k_cache, v_cache, tables, seq_lens, rows, out, head ** -0.5,
                                      window or None, threads)
        for s, n in enumerate(lens):
            pages = tables[s, :-(-n // bs)].to(torch.long)
            k = k_cache[pages].reshape(-1, kv_heads, head)[:n].float()
            v = v_cache[pages].reshape(-1, kv_heads, head)[:n].float()
            lo = max(0, n - window) if window else 0
            mask = torch.zeros(1, 1, n, dtype=torch.bool)
            mask[..., lo:] = True
            want = gqa_attention(q[rows[s], None, None].float(), k[None], v[None], mask, head ** -0.5)[0, 0]
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(out[rows[s]], want.to(dtype), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 1024), (9, 40), (3, 7), (70, 1024)])  # 70 x 1024 takes OpenMP threads
def test_silu_and_mul_matches_reference(tokens, inter, dtype):
    gen = torch.Generator().manual_seed(tokens + inter)
    wide = (4 * torch.randn(tokens, 2 * inter + 6, generator=gen)).to(dtype)
    x = wide[:, 3:3 + 2 * inter]  # a strided view: rows farther apart than 2I
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0], dtype=dtype)  # exp over- and underflow, zero
    got = native_ops.silu_and_mul(lib, x)
    want = reference.silu_and_mul(x)
    torch.testing.assert_close(got, want, **({} if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)))
    if dtype == torch.bfloat16:  # rounded where the reference rounds: at most one bf16 step apart
        assert (got.float() - want.float()).abs().le(want.float().abs() * 2 ** -7 + 1e-30).all()
    three = x.reshape(1, tokens, 2 * inter)
    torch.testing.assert_close(ops.silu_and_mul(three), reference.silu_and_mul(three))
    assert native_ops.silu_and_mul(lib, x.half()) is None
