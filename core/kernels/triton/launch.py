"""How the shared kernels are launched: compiled on a device, interpreted on CPU tensors.

Triton decides when it is imported whether ``@triton.jit`` compiles or interprets
(``TRITON_INTERPRET=1``), for our kernels and for its own library functions (``tl.sum``)
alike. Tensors on the CPU can only mean the interpreter (the conformance suite's
``--interpret`` mode sets the variable before anything imports Triton); a kernel launched
on them without it fails here with that explanation rather than deep inside Triton.
"""
from __future__ import annotations

import triton

INTERPRET_ENV = "TRITON_INTERPRET"


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two ``>= max(n, minimum)``."""
    return max(minimum, triton.next_power_of_2(int(n)))


def kernel_for(kernel, tensor):
    """``kernel``, after checking that CPU tensors meet an interpreted kernel."""
    if tensor.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            raise RuntimeError(
                f"Triton kernel {kernel.__name__} got CPU tensors, which only Triton's interpreter can run: "
                f"set {INTERPRET_ENV}=1 before triton is first imported (tokenmill conformance --interpret does)")
    return kernel
