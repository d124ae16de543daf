"""The hooks tokenmill-xpu registers (entry point ``xpu`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up, and
intel-extension-for-pytorch is imported only by code that uses its ops.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_xpu.platform import XpuPlatform

    return [XpuPlatform()]


# The shared Triton kernels (tokenmill.kernels.triton: one copy for CUDA, ROCm and XPU) for the
# platform name "xpu". Registering them imports no Triton; without Triton installed they register
# nothing and the core's reference serves. Ops not listed there fall back to the reference too.
# With IPEX for XPU usable, its RMSNorm and paged attention rank above them (tokenmill_xpu.ipex_ops).
@hookimpl
def tokenmill_kernels():
    from tokenmill.kernels.triton import kernel_impls
    from tokenmill_xpu.ipex_ops import xpu_ipex_kernels

    return kernel_impls("xpu", provider="tokenmill-xpu") + xpu_ipex_kernels("tokenmill-xpu")


@hookimpl
def tokenmill_attention_backends():
    from tokenmill.kernels.triton import attention_backend
    from tokenmill_xpu.ipex_ops import xpu_ipex_attention_backends

    backend = attention_backend("xpu")
    return ([backend] if backend is not None else []) + xpu_ipex_attention_backends()


def conformance_facts() -> dict:
    """Whether an XPU is here to run the device checks on, and whether IPEX serves (not a hook)."""
    from tokenmill_xpu.ipex_ops import xpu_ipex_status
    from tokenmill_xpu.platform import XpuPlatform

    avail = XpuPlatform().availability()
    device = ("present: every check runs on it" if avail else
              f"none here ({avail.reason}): device checks are skipped; the platform's torch.xpu memory and "
              f"device calls, and the IPEX glue, are checked against fakes by tokenmill's own tests "
              f"(tests/test_platform_plugins.py, tests/test_xpu_ipex.py)")
    return {"Intel XPU": device, "intel-extension-for-pytorch (XPU)": xpu_ipex_status()[1]}


# GPTQ, AWQ, int8/w8a8 and FP8 (where capabilities.fp8) through the shared Triton dequantize-matmuls,
# above the core's reference classes; none without Triton.
@hookimpl
def tokenmill_quantization_methods():
    from tokenmill.kernels.triton import quant_methods

    return quant_methods("xpu")
