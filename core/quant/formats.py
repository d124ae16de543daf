"""The core's reference quantization methods, registered through ``tokenmill_quantization_methods``."""
from __future__ import annotations

from tokenmill.quant.int8 import Int8Method

#: Reference implementations (dequantize, then matmul) of every format, priority 0, every platform.
REFERENCE_METHODS = (Int8Method,)
