"""Float linears on CPU with weights pre-packed once at load for oneDNN.

``F.linear`` on CPU hands every call to the BLAS library, which re-lays the ``[out, in]``
weight into its blocked format on each call; at decode's small batch sizes (M = 1..64
rows) that repacking costs more than the multiply, and the layer linears of a decode step
run at a fraction of the GEMM's speed. This method reorders each weight into oneDNN's
blocked layout once, in ``process_weights_after_loading``, keeps only that packed copy,
and multiplies with oneDNN's inner product (``torch.ops.mkldnn``), whose bias add is fused.

float32, and bfloat16 where oneDNN has bfloat16 kernels for this CPU (AVX512-BF16, AMX);
float16 keeps ``F.linear``. Stacks of experts keep the plain weight (the fused MoE kernel
reads it as it is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.params import expert_view
from tokenmill.quant.unquantized import UnquantizedMethod


def _ops():
    return getattr(torch.ops, "mkldnn", None)


class CpuPackedLinearMethod(UnquantizedMethod):
    """Unquantized float32/bfloat16 linears on CPU: oneDNN-packed weights, fused bias."""

    name = "none-onednn-packed"
    device_types = ("cpu",)
    priority = 10

    @classmethod
    def available(cls, platform) -> str | None:
        if not torch.backends.mkldnn.is_available():
            return "this torch is built without oneDNN (mkldnn)"
        ops = _ops()
        missing = [op for op in ("_reorder_linear_weight", "_linear_pointwise") if not hasattr(ops, op)]
        return f"this torch lacks torch.ops.mkldnn.{', '.join(missing)}" if missing else None

    def __init__(self, fmt: str = "none", quant_config: dict | None = None, dtype=None):
        super().__init__(fmt, quant_config, dtype)
        if dtype is not None and dtype not in self.dtypes():
            raise ValueError(f"oneDNN weight packing serves {', '.join(map(str, self.dtypes()))} on this CPU, "
                             f"not {dtype}")

    @staticmethod
    def dtypes() -> tuple:
        """The dtypes packed here: float32, and bfloat16 where oneDNN has bfloat16 kernels for this CPU."""
        bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)

    def describe(self) -> str:
        return f"{self.dtype}, weights packed for oneDNN at load"

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight
        if w.dim() != 2 or w.device.type != "cpu" or w.dtype != self.dtype:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
        # Replacing the parameter drops the checkpoint layout: the packed copy is the only one.
        layer.weight = torch.nn.Parameter(packed, requires_grad=False)

    def apply(self, layer, x, bias=None, expert=None):
        w = layer.weight
        if not w.is_mkldnn:  # an expert stack or a weight the method left as loaded
            return F.linear(x, expert_view(w, expert), bias)
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")

