"""The hooks tokenmill-cpu registers (entry point ``cpu`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_cpu.platform import CpuPlatform

    return [CpuPlatform()]


# Attention and ops that beat the reference on CPUs (tokenmill_cpu.attention, .ops), plus
# intel-extension-for-pytorch's paged attention and RMSNorm when it is usable (.ipex_attention,
# .ipex), ranked above the plugin's own. Importing them here would import torch: each hook
# imports on call.


@hookimpl
def tokenmill_attention_backends():
    from tokenmill_cpu.attention import CpuAttention
    from tokenmill_cpu.ipex_attention import ipex_attention_backends

    return [CpuAttention, *ipex_attention_backends()]


@hookimpl
def tokenmill_kernels():
    from tokenmill.ops.registry import KernelImpl
    from tokenmill_cpu.ipex import ipex_kernels
    from tokenmill_cpu.ops import CPU_OPS

    impls = [KernelImpl(op, "cpu", fn, provider="tokenmill-cpu", priority=10) for op, fn in CPU_OPS.items()]
    return impls + ipex_kernels("tokenmill-cpu")


@hookimpl
def tokenmill_quantization_methods():
    from tokenmill_cpu.linear import CpuPackedLinearMethod
    from tokenmill_cpu.quant import CPU_QUANT_METHODS

    return [*CPU_QUANT_METHODS, CpuPackedLinearMethod]


def conformance_facts() -> dict:
    """Which fast paths are in use here, for the conformance report's header (not a hook)."""
    from tokenmill_cpu import native
    from tokenmill_cpu.ipex import ipex_status

    native.load()
    usable, reason = ipex_status()
    if usable:
        reason += ("; registers rms_norm, fused_add_rms_norm and attention cpu-ipex (reshape_and_cache, "
                   "single_query_cached_kv_attention, flash_attn_varlen_func)")
    return {"native decode kernel": native.status(), "intel-extension-for-pytorch": reason}


def conformance_summary() -> dict:
    """What ran, for the conformance report once the checks are done (not a hook)."""
    from tokenmill_cpu.ipex import ipex_status, summary

    return {"IPEX ops called during the checks": summary() if ipex_status()[0] else "none (IPEX not used)"}
