"""The hooks tokenmill-tpu registers (entry point ``tpu`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up, and
torch_xla is imported only when the platform is asked whether it is available.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_tpu.platform import TpuPlatform

    return [TpuPlatform()]


# XLA-friendly kernels and a static-shape attention backend register here through
# ``tokenmill_kernels`` and ``tokenmill_attention_backends`` for the platform name "tpu".
