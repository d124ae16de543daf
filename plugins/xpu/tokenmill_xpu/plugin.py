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


# The shared Triton kernels (tokenmill.kernels.triton, one copy for CUDA, ROCm and XPU)
# and IPEX ops (through XpuPlatform.ipex()) register here through ``tokenmill_kernels``
# and ``tokenmill_attention_backends`` for the platform name "xpu".
