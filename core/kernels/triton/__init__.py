"""Portable Triton kernels, registered by the CUDA, ROCm and XPU plugins for their platforms.

A plugin registers them with three calls in its hooks::

    from tokenmill.kernels.triton import attention_backend, kernel_impls, quant_methods

    @hookimpl
    def tokenmill_kernels():
        return kernel_impls("cuda", provider="tokenmill-cuda")

    @hookimpl
    def tokenmill_attention_backends():
        return [attention_backend("cuda")]

    @hookimpl
    def tokenmill_quantization_methods():
        return quant_methods("cuda")

All return nothing when Triton is not installed (the reference then serves). Importing
this package does not import Triton: the kernels are compiled on their first launch.
Launched on CPU tensors, every kernel runs under Triton's interpreter, which is how the
conformance suite checks them on machines without a GPU (``tokenmill conformance cuda
--interpret``). Contents: :mod:`.paged_attention` (ragged paged attention and the K/V
cache write), :mod:`.norm` (RMSNorm, with fused residual add), :mod:`.rotary` and
:mod:`.activation` (SiLU-and-mul), :mod:`.quant_matmul` (GPTQ/AWQ int4 and int8, int8/W8A8/FP8
dequantize-matmuls) with their quantization methods in :mod:`.quant`.
"""
from tokenmill.kernels.triton.registration import attention_backend, kernel_impls, quant_methods, triton_available

__all__ = ["attention_backend", "kernel_impls", "quant_methods", "triton_available"]
