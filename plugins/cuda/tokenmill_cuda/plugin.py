"""The hooks tokenmill-cuda registers (entry point ``cuda`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_cuda.platform import CudaPlatform

    return [CudaPlatform()]


# The shared Triton kernels (tokenmill.kernels.triton: one copy for CUDA, ROCm and XPU) for the
# platform name "cuda". Registering them imports no Triton; without Triton installed they register
# nothing and the core's reference serves. Ops not listed there fall back to the reference too.
@hookimpl
def tokenmill_kernels():
    from tokenmill.kernels.triton import kernel_impls

    return kernel_impls("cuda", provider="tokenmill-cuda")


@hookimpl
def tokenmill_attention_backends():
    from tokenmill.kernels.triton import attention_backend

    backend = attention_backend("cuda")
    return [backend] if backend is not None else []


# GPTQ, AWQ, int8/w8a8 and FP8 (where capabilities.fp8) through the shared Triton dequantize-matmuls,
# above the core's reference classes; none without Triton.
@hookimpl
def tokenmill_quantization_methods():
    from tokenmill.kernels.triton import quant_methods

    return quant_methods("cuda")
