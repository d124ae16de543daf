"""Float linears on CPU: few rows through the plugin's C kernel, many through oneDNN on packed weights.

Two kernels, picked per call by the number of rows M:

* M <= :data:`tokenmill_cpu.native_linear.MAX_ROWS` (decode): the C kernel of
  :mod:`tokenmill_cpu.native_linear` streams the ``[out, in]`` weight once, in the checkpoint's
  layout, at close to the box's read bandwidth;
* larger M (prefill, big batches): oneDNN's inner product (``torch.ops.mkldnn``, bias add fused)
  on a copy of the weight reordered once into oneDNN's blocked layout at load, in
  ``process_weights_after_loading``. ``F.linear`` would re-lay the weight on every call, which
  costs 15-30% of a prefill GEMM's speed.

Keeping both layouts doubles the float linears' memory, so the packed copy is made only while
the copies made so far stay within :data:`PACKED_COPY_SHARE` of the host's available memory
(measured at the first layer); past it a layer's large-M calls use ``F.linear``. Without the C
kernel (no compiler, ``TOKENMILL_CPU_NATIVE=0``) only the packed copy is kept, for every M.

float32, and bfloat16 (the C kernel widens it; oneDNN packs it where it has bfloat16 kernels for
this CPU: AVX512-BF16, AMX; where it has none, the C kernel serves every M, since the other
choice, ``F.linear``, is 4-5x slower); float16 keeps ``F.linear``. Stacks of experts keep the plain weight
(the fused MoE kernel reads it as it is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.platform import host_memory_info
from tokenmill.quant.params import expert_view
from tokenmill.quant.unquantized import UnquantizedMethod

from tokenmill_cpu import native, native_linear
from tokenmill_cpu.threads import configure_threads

#: Largest share of the host's available memory (at load) that packed copies may take while
#: the plain weights are kept for the small-row kernel.
PACKED_COPY_SHARE = 0.25


def _ops():
    return getattr(torch.ops, "mkldnn", None)


def _onednn_ok() -> bool:
    ops = _ops()
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


def _onednn_bf16() -> bool:
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bf16 is not None and bool(bf16())


class CpuPackedLinearMethod(UnquantizedMethod):
    """Unquantized float32/bfloat16 linears on CPU: C kernel for few rows, oneDNN-packed weights for many."""

    name = "none-cpu-rows-onednn"
    device_types = ("cpu",)
    priority = 10

    @classmethod
    def available(cls, platform) -> str | None:
        if _onednn_ok() or native.library() is not None:
            return None
        return f"this torch has no usable oneDNN (mkldnn) and the cpu plugin's C kernels: {native.status()}"

    def __init__(self, fmt: str = "none", quant_config: dict | None = None, dtype=None):
        super().__init__(fmt, quant_config, dtype)
        if dtype is not None and dtype not in self.dtypes():
            raise ValueError(f"the cpu linears serve {', '.join(map(str, self.dtypes()))} on this CPU, not {dtype}")
        self.lib = native.library()
        self.num_threads = configure_threads()
        # Without oneDNN bfloat16 kernels the alternative for many rows is F.linear, which the C
        # kernel beats at every M (4-5x from 32 to 2048 rows on the Zen 3 box): no row limit then.
        self._bf16_rows = 0 if not self.packs(torch.bfloat16) else None
        self._copy_budget: int | None = None

    @staticmethod
    def packs(dtype) -> bool:
        """Whether oneDNN packs weights of ``dtype`` here: float32, and bfloat16 where it has bfloat16 kernels."""
        return _onednn_ok() and (dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_bf16()))

    @classmethod
    def dtypes(cls) -> tuple:
        """The dtypes served: those oneDNN packs, and those the C kernel computes (when it is built)."""
        rows = native.library() is not None
        return tuple(d for d in (torch.float32, torch.bfloat16)
                     if cls.packs(d) or (rows and native_linear.supports(d)))

    def describe(self) -> str:
        if self.lib is not None and self.dtype == torch.bfloat16 and self._bf16_rows == 0:
            return f"{self.dtype}, C kernel at every row count (no oneDNN bfloat16 kernels on this CPU)"
        rows = f"C kernel up to {native_linear.MAX_ROWS} rows, " if self.lib is not None else ""
        big = "oneDNN on weights packed at load" if self.packs(self.dtype) else "F.linear"
        return f"{self.dtype}, {rows}{big} above"

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight
        if w.dim() != 2 or w.device.type != "cpu" or w.dtype != self.dtype:
            return
        if not w.is_contiguous():  # the row kernel reads the rows in place
            layer.weight = torch.nn.Parameter(w.detach().contiguous(), requires_grad=False)
        w = layer.weight.detach()
        layer.weight_packed = None
        if not self.packs(w.dtype):
            return
        if self.lib is None:  # oneDNN serves every M: the packed copy is the only one
            layer.weight = torch.nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w), requires_grad=False)
            return
        if self._copy_budget is None:
            self._copy_budget = int(host_memory_info().free * PACKED_COPY_SHARE)
        size = w.numel() * w.element_size()
        if size <= self._copy_budget:  # packed only when kept
            self._copy_budget -= size
            layer.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w)

    def row_limit(self, dtype) -> int:
        """Most rows the C kernel takes for weights of ``dtype`` (0: every row count)."""
        rows = self._bf16_rows if dtype == torch.bfloat16 else None
        return native_linear.MAX_ROWS if rows is None else rows

    def apply(self, layer, x, bias=None, expert=None):
        w = layer.weight
        if w.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        if expert is None and self.lib is not None and w.dim() == 2:
            y = native_linear.linear(self.lib, x, w, bias, self.num_threads, self.row_limit(w.dtype))
            if y is not None:
                return y
        packed = getattr(layer, "weight_packed", None)
        if packed is not None and expert is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, expert_view(w, expert), bias)
