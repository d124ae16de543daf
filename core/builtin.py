"""The core's own built-ins, registered through the same hooks as any plugin.

Imports happen inside the hooks so that loading the plugin manager stays cheap.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl
from tokenmill.version import CONTRACT_VERSION

TOKENMILL_CONTRACT = CONTRACT_VERSION
#: Priority of the reference ops: below anything a plugin registers.
REFERENCE_PRIORITY = -1000


@hookimpl
def tokenmill_kernels():
    from tokenmill.ops.reference import REFERENCE_OPS
    from tokenmill.ops.registry import KernelImpl

    return [KernelImpl(op, "*", fn, provider="reference", priority=REFERENCE_PRIORITY)
            for op, fn in REFERENCE_OPS.items()]


@hookimpl
def tokenmill_attention_backends():
    from tokenmill.attention.reference import ReferenceAttention

    return [ReferenceAttention]


@hookimpl
def tokenmill_quantization_methods():
    from tokenmill.quant.formats import REFERENCE_METHODS

    return list(REFERENCE_METHODS)


@hookimpl
def tokenmill_guided_decoding_backends():
    from tokenmill.guided.outlines_backend import OutlinesBackend
    from tokenmill.guided.xgrammar_backend import XGrammarBackend

    return [XGrammarBackend, OutlinesBackend]


@hookimpl
def tokenmill_model_architectures():
    from tokenmill.models.registry import ARCHITECTURES

    return list(ARCHITECTURES)
