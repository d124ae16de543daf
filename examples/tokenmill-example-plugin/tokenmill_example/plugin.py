"""The hooks of tokenmill-example-plugin (entry point ``example`` in the group ``tokenmill``).

Imported at tokenmill start-up: the hooks import their modules (and torch) when called.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_example.platform import ExamplePlatform

    return [ExamplePlatform()]


@hookimpl
def tokenmill_attention_backends():
    from tokenmill_example.attention import ExampleAttention

    return [ExampleAttention]


@hookimpl
def tokenmill_kernels():
    from tokenmill.ops.registry import KernelImpl
    from tokenmill_example import kernels

    return [KernelImpl("silu_and_mul", "example", kernels.silu_and_mul, provider="tokenmill-example-plugin"),
            KernelImpl("rms_norm", "example", kernels.rms_norm, provider="tokenmill-example-plugin")]
