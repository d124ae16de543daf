"""The cpu plugin's C kernels for RMSNorm and rotary: equal to the reference, on the engine's strided views."""
from __future__ import annotations

import pytest
import torch

from tokenmill.ops import reference
from tokenmill_cpu import native, native_ops, ops

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
