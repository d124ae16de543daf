"""The core's reference quantization methods, registered through ``tokenmill_quantization_methods``."""
from __future__ import annotations

from tokenmill.quant.awq import AWQMethod
from tokenmill.quant.compressed_tensors import CompressedTensorsMethod
from tokenmill.quant.fp8 import Fp8Method, Fp8ScaledMMMethod
from tokenmill.quant.gptq import GPTQMethod
from tokenmill.quant.int8 import Int8Method
from tokenmill.quant.unquantized import UnquantizedMethod

#: Reference implementations (dequantize, then matmul) of every format, priority 0, every platform,
#: the FP8 matmul for platforms that declare ``capabilities.fp8``, and the float ``F.linear``
#: (online mode ``none``) that a platform may replace with a faster float linear.
REFERENCE_METHODS = (UnquantizedMethod, Int8Method, Fp8Method, Fp8ScaledMMMethod, GPTQMethod, AWQMethod,
                     CompressedTensorsMethod)
