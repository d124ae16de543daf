"""A stand-in for intel-extension-for-pytorch in plain torch, for machines without IPEX.

It implements the few IPEX entry points tokenmill calls, with IPEX's behaviour as measured
on IPEX 2.8 (CPU) and as IPEX documents it for XPU, and is as strict as IPEX where IPEX
would crash or misbehave, so glue that feeds IPEX wrong inputs fails here first:

* ``llm.functional.rms_norm`` / ``add_rms_norm`` (``add_back`` writes ``x + residual``
  into ``residual``);
* ``llm.modules.PagedAttention``: ``reshape_and_cache`` (slot ``-1`` is an error: IPEX
  writes out of bounds), ``single_query_cached_kv_attention`` (``window_size``: the last
  ``window_size`` keys) and ``flash_attn_varlen_func`` (causal, aligned to each sequence's
  end; ``window_size_left``: that many keys before the query's own). ``layout="cpu"``:
  caches ``[blocks, kv_heads, block_size, head]`` (IPEX's CPU kernels); ``layout="xpu"``:
  ``[blocks, block_size, kv_heads, head]`` with ``reshape_and_cache_flash`` (IPEX for XPU).

The real IPEX is checked by ``.ci/ipex.sh`` (the conformance suite against IPEX 2.8).
"""
from __future__ import annotations

import types

import torch


def _rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _add_rms_norm(residual, x, weight, bias, eps, add_back=False):
    assert bias is None
    total = x + residual
    if add_back:
        residual.copy_(total)
    return _rms_norm(total, weight, eps)


def make_fake_ipex(layout: str = "cpu", version: str = "0.0.0") -> types.SimpleNamespace:
    """The fake module (``.llm.functional``, ``.llm.modules.PagedAttention``, ``.calls``)."""
    calls: list[str] = []

    def pages(cache, table, length, block_size):
        """Keys ``[length, kv_heads, head]`` of one sequence, read through its block table."""
        n = -(-length // block_size)
        blocks = cache.index_select(0, table[:n].to(torch.long))
        if layout == "cpu":
            blocks = blocks.transpose(1, 2)
        return blocks.reshape(n * block_size, *blocks.shape[2:])[:length]

    def attend(q, keys, values, head_mapping, scale, left):
        """``q`` ``[Lq, H, D]`` at the last ``Lq`` positions of ``keys``; ``left`` < 0: no window."""
        length, lq = keys.shape[0], q.shape[0]
        k = keys.float().index_select(1, head_mapping.to(torch.long))
        v = values.float().index_select(1, head_mapping.to(torch.long))
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        pos = torch.arange(length - lq, length)[:, None]
        t = torch.arange(length)[None, :]
        allowed = t <= pos
        if left >= 0:
            allowed &= t >= pos - left
        return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)

    def write(key, value, key_cache, value_cache, slot_mapping, *args):
        assert key.is_contiguous() and value.is_contiguous(), "IPEX reads key/value as contiguous rows"
        assert slot_mapping.dtype == torch.int64
        if layout == "cpu":
            num_blocks, _, block_size, _ = key_cache.shape
        else:
            num_blocks, block_size, _, _ = key_cache.shape
        if slot_mapping.numel() and not bool(((slot_mapping >= 0) & (slot_mapping < num_blocks * block_size)).all()):
            raise RuntimeError(f"slot out of range (IPEX would write out of bounds): {slot_mapping.tolist()}")
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        if layout == "cpu":
            key_cache[blocks, :, offsets] = key
            value_cache[blocks, :, offsets] = value
        else:
            key_cache[blocks, offsets] = key
            value_cache[blocks, offsets] = value

    def reshape_and_cache(*args, **kwargs):
        assert layout == "cpu", "IPEX for XPU's flash attention reads what reshape_and_cache_flash writes"
        calls.append("reshape_and_cache")
        write(*args, **kwargs)

    def reshape_and_cache_flash(*args, **kwargs):
        calls.append("reshape_and_cache_flash")
        write(*args, **kwargs)

    def single_query_cached_kv_attention(out, query, key_cache, value_cache, head_mapping, scale, block_tables,
                                         context_lens, block_size, max_context_len, alibi_slopes, window_size=-1,
                                         *args):
        calls.append("single_query_cached_kv_attention")
        assert query.is_contiguous() and block_tables.dtype == context_lens.dtype == torch.int32
        assert int(context_lens.max()) <= max_context_len
        for i in range(query.shape[0]):
            n = int(context_lens[i])
            left = window_size - 1 if window_size > 0 else -1
            out[i] = attend(query[i:i + 1], pages(key_cache, block_tables[i], n, block_size),
                            pages(value_cache, block_tables[i], n, block_size), head_mapping, scale, left)[0]

    def flash_attn_varlen_func(out, query, key_cache, value_cache, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q,
                               max_seqlen_kv, scale, is_cusal, block_tables, alibi_slopes, window_size_left=-1,
                               window_size_right=-1, *args):
        calls.append("flash_attn_varlen_func")
        assert is_cusal and query.is_contiguous() and block_tables.dtype == torch.int32
        assert cu_seqlens_q.dtype == cu_seqlens_kv.dtype == torch.int32
        block_size = key_cache.shape[2] if layout == "cpu" else key_cache.shape[1]
        num_heads = query.shape[1]
        kv_heads = key_cache.shape[1] if layout == "cpu" else key_cache.shape[2]
        head_mapping = torch.arange(num_heads) // (num_heads // kv_heads)
        for i in range(cu_seqlens_q.shape[0] - 1):
            lo, hi = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            n = int(cu_seqlens_kv[i + 1] - cu_seqlens_kv[i])
            assert hi - lo <= max_seqlen_q and n <= max_seqlen_kv
            if hi > lo:
                out[lo:hi] = attend(query[lo:hi], pages(key_cache, block_tables[i], n, block_size),
                                    pages(value_cache, block_tables[i], n, block_size), head_mapping, scale,
                                    window_size_left)

    def counted(fn, name):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    paged = types.SimpleNamespace(reshape_and_cache=reshape_and_cache, reshape_and_cache_flash=reshape_and_cache_flash,
                                  single_query_cached_kv_attention=single_query_cached_kv_attention,
                                  flash_attn_varlen_func=flash_attn_varlen_func)
    functional = types.SimpleNamespace(rms_norm=counted(_rms_norm, "rms_norm"),
                                       add_rms_norm=counted(_add_rms_norm, "add_rms_norm"))
    llm = types.SimpleNamespace(functional=functional, modules=types.SimpleNamespace(PagedAttention=paged))
    return types.SimpleNamespace(__version__=version, llm=llm, calls=calls)


PACKAGE_INIT = """
import fake_ipex
_fake = fake_ipex.make_fake_ipex({layout!r}, {version!r})
__version__, llm, calls = _fake.__version__, _fake.llm, _fake.calls
"""


def install_fake_ipex(tmp_path, monkeypatch, version: str, layout: str = "cpu", init: str | None = None) -> str:
    """Put an ``intel_extension_for_pytorch`` package of ``version`` on ``sys.path`` (``init``: its code)."""
    pkg = tmp_path / "intel_extension_for_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init if init is not None else PACKAGE_INIT.format(layout=layout, version=version))
    dist = tmp_path / f"intel_extension_for_pytorch-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel-extension-for-pytorch\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return version
