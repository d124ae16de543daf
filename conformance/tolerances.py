"""The tolerances the suite holds plugins to, per dtype: ``(atol, rtol)`` for ``torch.allclose``.

Kernels are compared with the core's reference op run on the CPU on the same inputs, in
the same dtype. Attention is compared with the reference backend run in float32 on the
same (up-cast) inputs, so its tolerances also absorb the rounding of the output to the
dtype. Float32 bounds are tight enough that a wrong index or mask fails by orders of
magnitude; the half-precision ones allow a few units in the last place.
"""
from __future__ import annotations

KERNEL_TOLERANCES = {
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}

ATTENTION_TOLERANCES = {
    "float32": (2e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


#: Quantized matmuls: the largest ``|out - reference|`` allowed, relative to the largest
#: ``|reference|``, per format and dtype. The reference runs in float32 on the same
#: (dtype-rounded) inputs and the same stored weights, so weight-only formats differ only
#: by accumulation order and output rounding; an implementation that quantizes
#: activations where the reference does not (FP8 ``_scaled_mm``) gets FP8's 3-bit mantissa.
QUANT_TOLERANCES = {
    "default": {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2},
    "fp8": {"float32": 8e-2, "float16": 8e-2, "bfloat16": 8e-2},
}


def quant_tolerance(fmt: str, dtype: str) -> float:
    table = QUANT_TOLERANCES.get(fmt, QUANT_TOLERANCES["default"])
    return table.get(dtype, table["bfloat16"])


def kernel_tolerance(dtype: str) -> tuple[float, float]:
    return KERNEL_TOLERANCES.get(dtype, KERNEL_TOLERANCES["bfloat16"])


def attention_tolerance(dtype: str) -> tuple[float, float]:
    return ATTENTION_TOLERANCES.get(dtype, ATTENTION_TOLERANCES["bfloat16"])


def compare(name: str, actual, expected, atol: float, rtol: float) -> None:
    """Assert ``actual`` matches ``expected`` (shape, dtype-free values); the message locates the worst error."""
    import torch

    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float32)
    e = expected.detach().to("cpu", torch.float32)
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name}: output has inf/nan"
    if torch.allclose(a, e, atol=atol, rtol=rtol):
        return
    err = (a - e).abs()
    excess = err - (atol + rtol * e.abs())
    idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(excess), err.shape))
    bad = int((excess > 0).sum())
    raise AssertionError(f"{name}: {bad} of {err.numel()} values outside atol={atol:g} rtol={rtol:g}; "
                         f"max |err| {err.max().item():.3g}; worst at index {idx}: got {a[idx].item():.6g}, "
                         f"expected {e[idx].item():.6g}")
