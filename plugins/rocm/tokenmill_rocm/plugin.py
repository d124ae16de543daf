"""The hooks tokenmill-rocm registers (entry point ``rocm`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_rocm.platform import RocmPlatform

    return [RocmPlatform()]


# The shared Triton kernels (tokenmill.kernels.triton, one copy for CUDA, ROCm and XPU)
# register here through ``tokenmill_kernels`` and ``tokenmill_attention_backends`` for
# the platform name "rocm"; ops not registered fall back to the core's reference.
