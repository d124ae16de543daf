"""IPEX for XPU: its RMSNorm and paged attention for the xpu platform, when it is usable.

Usable means: intel-extension-for-pytorch is installed as the XPU build (its version
carries ``+xpu``; the CPU build serves the cpu plugin instead), matches torch's
major.minor, and imports. :func:`xpu_ipex_status` says which case holds.

What it registers (device type ``xpu``):

* ``rms_norm`` and ``fused_add_rms_norm`` from ``ipex.llm.functional``;
* attention ``xpu-ipex``: IPEX for XPU's flash paged attention, whose cache is the core's
  default layout ``[2, blocks, block_size, kv_heads, head_size]``: K/V written with
  ``PagedAttention.reshape_and_cache_flash`` (slot ``-1`` rows dropped first), every
  step one ``flash_attn_varlen_func`` call over the ragged batch (causal, aligned to each
  sequence's end; window: ``window - 1`` keys before the query's own).

No XPU and no IPEX for XPU exist where this was written: the glue is tested against a
fake IPEX with these semantics (tests/fake_ipex.py), and the conformance suite checks
the real ops against the reference wherever an XPU is present.
"""
from __future__ import annotations

import logging

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata
from tokenmill.extensions import optional_extension

log = logging.getLogger(__name__)
#: The outcome of importing IPEX (see :func:`tokenmill.extensions.optional_extension`).
_loaded: dict = {}


def _xpu_ipex():
    """``(the IPEX module or None, reason)`` on the xpu platform."""
    from tokenmill_xpu import platform

    def gate(version: str) -> str | None:
        return None if platform.is_xpu_build(version) else "is not the XPU build (the CPU build serves the cpu plugin)"

    return optional_extension(platform.IPEX_MODULE, platform.IPEX_DIST,
                              "the shared Triton kernels or the reference serve", _loaded, gate)


def xpu_ipex_status() -> tuple[bool, str]:
    """``(usable, reason)`` for IPEX on the xpu platform."""
    module, reason = _xpu_ipex()
    return module is not None, reason


def load_xpu_ipex():
    """The IPEX module when :func:`xpu_ipex_status` says it is usable, else None."""
    module, reason = _xpu_ipex()
    if module is None:
        log.info("tokenmill-xpu: %s", reason)
    return module


def xpu_ipex_kernels(provider: str, ipex=None) -> list:
    """IPEX's RMSNorm ops for the xpu platform (``ipex``: the module; default :func:`load_xpu_ipex`)."""
    ipex = ipex if ipex is not None else load_xpu_ipex()
    if ipex is None:
        return []
    from tokenmill.ops.registry import KernelImpl

    functional = ipex.llm.functional

    def rms_norm(x, weight, eps):
        return functional.rms_norm(x, weight, eps)

    def fused_add_rms_norm(x, residual, weight, eps):
        new_residual = residual.clone()  # add_back=True writes x + residual into it; ops are functional
        return functional.add_rms_norm(new_residual, x, weight, None, eps, True), new_residual

    return [KernelImpl(op, "xpu", fn, provider=f"{provider}+ipex", priority=20)
            for op, fn in (("rms_norm", rms_norm), ("fused_add_rms_norm", fused_add_rms_norm))]


class IpexXpuAttentionBase(AttentionBackend):
    """IPEX for XPU's flash paged attention; :func:`xpu_ipex_attention_backend` binds the ops."""

    name = "xpu-ipex"
    device_types = ("xpu",)
    priority = 20  # above the shared Triton backend
    head_sizes = None
    dtypes = ("float32", "float16", "bfloat16")
    sliding_window = True
    gqa = True
    #: IPEX's ``reshape_and_cache_flash`` and ``flash_attn_varlen_func``.
    write = varlen_attention = None

    @classmethod
    def prepare(cls, meta: AttentionMetadata) -> None:
        import torch

        slots = meta.slot_mapping.to(torch.int64)
        rows = None
        if not bool((slots >= 0).all()):
            rows = (slots >= 0).nonzero().flatten()
            slots = slots.index_select(0, rows)
        dev, bs = meta.seq_lens.device, meta.block_size
        nb = max(1, max(-(-n // bs) for n in meta.seq_lens_cpu))
        needed = (meta.seq_lens.to(torch.int64) + bs - 1) // bs
        tables = torch.where(torch.arange(nb, device=dev)[None, :] < needed[:, None],
                             meta.block_tables[:, :nb].to(torch.int32), 0).contiguous()
        cu_kv = torch.zeros(len(meta.seq_lens_cpu) + 1, dtype=torch.int32, device=dev)
        torch.cumsum(meta.seq_lens.to(torch.int32), 0, out=cu_kv[1:])
        meta.extra = (slots, rows, tables, meta.query_start_loc.to(torch.int32), cu_kv)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        import torch

        if not isinstance(meta.extra, tuple) or len(meta.extra) != 5:
            self.prepare(meta)
        slots, rows, tables, cu_q, cu_kv = meta.extra
        spec = self.spec
        num_tokens, h, hk, d = q.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_size
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        k, v = k.reshape(num_tokens, hk, d), v.reshape(num_tokens, hk, d)
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        if slots.numel():
            type(self).write(k.to(key_cache.dtype).contiguous(), v.to(value_cache.dtype).contiguous(), key_cache,
                             value_cache, slots)
        q = q.reshape(num_tokens, h, d).contiguous()
        out = torch.empty(num_tokens, h, d, dtype=q.dtype, device=q.device)
        window = spec.sliding_window
        type(self).varlen_attention(out, q, key_cache, value_cache, cu_q, cu_kv, meta.max_query_len,
                                    meta.max_seq_len, self.scale, True, tables, None,
                                    (window - 1) if window else -1, 0 if window else -1)
        return out.view(num_tokens, h * d)


def xpu_ipex_attention_backend(ipex) -> type:
    """An :class:`IpexXpuAttentionBase` subclass calling ``ipex``'s PagedAttention ops."""
    ops = ipex.llm.modules.PagedAttention
    return type("IpexXpuAttention", (IpexXpuAttentionBase,), {
        "__doc__": IpexXpuAttentionBase.__doc__, "__module__": __name__,
        "write": staticmethod(ops.reshape_and_cache_flash),
        "varlen_attention": staticmethod(ops.flash_attn_varlen_func)})


def xpu_ipex_attention_backends(ipex=None) -> list[type]:
    """``[the IPEX backend]`` when IPEX for XPU is usable, else ``[]``."""
    ipex = ipex if ipex is not None else load_xpu_ipex()
    return [xpu_ipex_attention_backend(ipex)] if ipex is not None else []
