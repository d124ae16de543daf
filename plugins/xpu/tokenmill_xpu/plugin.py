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
@hookimpl
def tokenmill_kernels():
    from tokenmill.kernels.triton import kernel_impls

    return kernel_impls("xpu", provider="tokenmill-xpu")


@hookimpl
def tokenmill_attention_backends():
    from tokenmill.kernels.triton import attention_backend

    backend = attention_backend("xpu")
    return [backend] if backend is not None else []
