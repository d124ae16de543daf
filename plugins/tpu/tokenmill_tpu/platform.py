"""The TPU platform through torch-xla (PJRT runtime).

Every new input shape makes XLA compile a new graph, so the platform declares
``static_shapes``: the model runner pads each step to shape buckets, each step ends
with ``mark_step`` (:meth:`TpuPlatform.step_end`), and :meth:`TpuPlatform.compile_count`
reads torch_xla's compile counter so the conformance suite can bound it.

With ``PJRT_DEVICE=CPU`` torch_xla runs the same XLA graphs on the host (XLA:CPU): the
platform is then available, for testing this code path without a TPU, at a priority
below the cpu platform's so that ``--device auto`` never picks it.
"""
from __future__ import annotations

import importlib.util
import os

from tokenmill.extensions import one_line
from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info

#: PJRT devices this platform runs on: a real TPU, or XLA:CPU for testing.
PJRT_DEVICES = ("TPU", "CPU")


class TpuPlatform(Platform):
    """Google Cloud TPUs; torch's device type is ``xla``; collectives through the ``xla`` backend."""

    name = "tpu"
    torch_device_type = "xla"
    dist_backend = "xla"
    ray_resource = "TPU"
    capabilities = Capabilities(dtypes=("float32", "bfloat16"), fp8=False, graphs=False, static_shapes=True,
                                async_execution=True,
                                pinned_memory=False)

    @property
    def priority(self) -> int:
        return -10 if os.environ.get("PJRT_DEVICE", "").upper() == "CPU" else 80

    def availability(self) -> Availability:
        if importlib.util.find_spec("torch_xla") is None:
            return Availability(False, "torch_xla is not installed")
        try:
            import torch_xla  # noqa: F401 - importing selects the PJRT device when none is set
            import torch_xla.runtime as xr

            device_type = xr.device_type()
        except Exception as exc:  # noqa: BLE001 - availability() never raises
            return Availability(False, f"torch_xla failed to import: {one_line(exc)}")
        if device_type is None:
            return Availability(False, "torch_xla found but no PJRT device selected (set PJRT_DEVICE=TPU)")
        if str(device_type).upper() not in PJRT_DEVICES:
            return Availability(False, f"torch_xla found but PJRT device is {device_type}, not TPU (or CPU)")
        try:
            count = xr.global_runtime_device_count()
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"PJRT {device_type} runtime failed to start: {one_line(exc)}")
        if not count:
            return Availability(False, f"torch_xla found but no {device_type} device visible")
        return Availability(True)

    def _on_host(self) -> bool:
        import torch_xla.runtime as xr

        return str(xr.device_type()).upper() == "CPU"

    def device(self, index: int = 0):
        import torch_xla

        if hasattr(torch_xla, "device"):
            return torch_xla.device(index)
        import torch_xla.core.xla_model as xm

        return xm.xla_device(index)

    def memory_info(self, index: int = 0) -> MemoryInfo:
        if self._on_host():
            return host_memory_info()  # XLA:CPU keeps its buffers in host RAM
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device(index))
        if "bytes_limit" in info:  # torch_xla >= 2.1
            total = int(info["bytes_limit"])
            return MemoryInfo(free=total - int(info["bytes_used"]), total=total)
        return MemoryInfo(free=int(info["kb_free"]) * 1024, total=int(info["kb_total"]) * 1024)

    def kv_cache_budget(self, fraction: float) -> int:
        if self._on_host():  # leave the host room for everything else, as the cpu platform does
            return int(min(self.memory_info().free * fraction * 0.5, 4 << 30))
        return super().kv_cache_budget(fraction)

    def allocate(self, shape: tuple[int, ...], dtype):
        import torch
        import torch_xla.core.xla_model as xm

        pool = torch.zeros(shape, dtype=dtype, device=self.device())
        # Materialise the zeros now: left pending, they would join the first step's graph, which
        # would then differ from every later step of the same shape (one compilation more).
        xm.mark_step()
        return pool

    def inference_mode(self):
        import torch

        return torch.no_grad()  # XLA tensors cannot be inference tensors

    def step_end(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.mark_step()

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()

    def compile_count(self) -> int | None:
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def describe(self) -> dict:
        facts: dict = {"torch_xla": None}
        try:
            from importlib import metadata

            if importlib.util.find_spec("torch_xla") is not None:
                facts["torch_xla"] = metadata.version("torch_xla")
                if self.availability():
                    import torch_xla.runtime as xr

                    facts["device_count"] = xr.global_runtime_device_count()
                    facts["pjrt_device"] = xr.device_type()
                    from tokenmill_tpu.attention import attention_mode

                    facts["attention"] = attention_mode()
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = one_line(exc)
        return facts
