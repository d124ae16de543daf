"""Float linears on CPU: few rows through the plugin's C kernels, many through oneDNN on packed weights.

Three kernels, picked per call by the dtype and the number of rows M:

* M <= :data:`tokenmill_cpu.native_tiles.MAX_ROWS` (decode, small prefills): the
  register-blocked C kernel of :mod:`tokenmill_cpu.native_tiles`, on a copy of the weight
  repacked once at load into K-major tiles of output features (ahead of oneDNN up to 32 rows,
  level at 64);
* a layer without the tiled copy, M <= :data:`tokenmill_cpu.native_linear.MAX_ROWS`: the C
  kernel of :mod:`tokenmill_cpu.native_linear`, which streams the ``[out, in]`` weight once in
  the checkpoint's layout;
* larger M (prefill, big batches): oneDNN's inner product (``torch.ops.mkldnn``, bias add fused)
  on a copy of the weight reordered once into oneDNN's blocked layout at load, in
  ``process_weights_after_loading``. ``F.linear`` would re-lay the weight on every call, which
  costs 15-30% of a prefill GEMM's speed.

Each layer holds two copies of its weight at most. The tiled copy is made first, while the
copies made so far stay within :data:`PACKED_COPY_SHARE` of the host's available memory
(measured at the first layer); the oneDNN copy then replaces the plain weight (``layer.weight``
becomes oneDNN's tensor, which also takes any call the tiled kernel declines), so it costs no
memory. A layer past the budget keeps the plain weight: then a oneDNN copy is made beside it only
within the budget (the row kernel reads the plain weight); with the tiled copy alone, the tiled
kernel serves every M (0.93x oneDNN at 256 rows); with no copy, the row kernel serves few rows and
``F.linear`` the rest. Without the C kernels (no compiler, ``TOKENMILL_CPU_NATIVE=0``) the oneDNN
copy replaces the plain weight and serves every M.

float32, and bfloat16 (oneDNN packs it where it has bfloat16 kernels for this CPU: AVX512-BF16,
AMX; where it has none, the C kernels serve every M, since the other choice, ``F.linear``, is
4-5x slower); float16 keeps ``F.linear``. Stacks of experts keep the plain weight
(the fused MoE kernel reads it as it is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.platform import host_memory_info
from tokenmill.quant.params import expert_view
from tokenmill.quant.unquantized import UnquantizedMethod

from tokenmill_cpu import native, native_linear, native_tiles
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
            return f"{self.dtype}, C kernel on tiled weights at every row count (no oneDNN bfloat16 kernels on this CPU)"
        rows = f"C kernel on tiled weights up to {native_tiles.MAX_ROWS} rows, " if self.lib is not None else ""
        big = "oneDNN on weights packed at load" if self.packs(self.dtype) else "F.linear"
        return f"{self.dtype}, {rows}{big} above"

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight
        if w.dim() != 2 or w.device.type != "cpu" or w.dtype != self.dtype:
            return
        if not w.is_contiguous():  # the row kernel reads the rows in place
            layer.weight = torch.nn.Parameter(w.detach().contiguous(), requires_grad=False)
        w = layer.weight.detach()
        layer.weight_packed = layer.weight_tiles = None
        if self.lib is not None and native_tiles.supports(w.dtype) and self._take(w):
            layer.weight_tiles = native_tiles.pack(self.lib, w)
        if not self.packs(w.dtype):
            return
        if self.lib is None or layer.weight_tiles is not None:
            # Nothing reads the plain weight then: oneDNN's copy takes its place.
            layer.weight = torch.nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w), requires_grad=False)
        elif self._take(w):
            layer.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w)

    def _take(self, w) -> bool:
        """Whether one more copy of ``w`` fits the copy budget (and take it from the budget if so)."""
        if self._copy_budget is None:
            self._copy_budget = int(host_memory_info().free * PACKED_COPY_SHARE)
        size = w.numel() * w.element_size()
        if size > self._copy_budget:
            return False
        self._copy_budget -= size
        return True

    def row_limit(self, layer) -> int:
        """Most rows ``layer``'s C kernel takes (0: every row count): the tiled one's where it has tiles."""
        if getattr(layer, "weight_tiles", None) is not None:
            return native_tiles.MAX_ROWS if layer.weight.is_mkldnn else 0
        rows = self._bf16_rows if layer.weight.dtype == torch.bfloat16 else None
        return native_linear.MAX_ROWS if rows is None else rows

    def apply(self, layer, x, bias=None, expert=None):
        w = layer.weight
        tiles = getattr(layer, "weight_tiles", None)
        if expert is None and tiles is not None:
            # without oneDNN's copy the tiled kernel takes every M: 0.93x oneDNN at 256 rows, F.linear far less
            y = native_tiles.linear(self.lib, x, tiles, w.shape[0], bias, self.num_threads,
                                    None if w.is_mkldnn else 0)
            if y is not None:
                return y
        if w.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        packed = getattr(layer, "weight_packed", None)
        if expert is None and tiles is None and self.lib is not None and w.dim() == 2:
            y = native_linear.linear(self.lib, x, w, bias, self.num_threads, self.row_limit(layer))
            if y is not None:
                return y
        if packed is not None and expert is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, expert_view(w, expert), bias)
