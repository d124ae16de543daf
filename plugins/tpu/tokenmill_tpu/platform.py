"""The TPU platform through torch-xla (PJRT runtime).

Every new input shape makes XLA compile a new graph, so the platform declares
``static_shapes`` and the model runner pads batches to a few bucket sizes.
"""
from __future__ import annotations

import importlib.util

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class TpuPlatform(Platform):
    """Google Cloud TPUs; torch's device type is ``xla``; collectives through the ``xla`` backend."""

    name = "tpu"
    torch_device_type = "xla"
    priority = 80
    dist_backend = "xla"
    ray_resource = "TPU"
    capabilities = Capabilities(dtypes=("float32", "bfloat16"), fp8=False, graphs=False, static_shapes=True,
                                pinned_memory=False)

    def availability(self) -> Availability:
        if importlib.util.find_spec("torch_xla") is None:
            return Availability(False, "torch_xla is not installed")
        try:
            import torch_xla  # noqa: F401 - importing selects the PJRT device when none is set
            import torch_xla.runtime as xr

            device_type = xr.device_type()
        except Exception as exc:  # noqa: BLE001 - availability() never raises
            return Availability(False, f"torch_xla failed to import: {_one_line(exc)}")
        if device_type is None:
            return Availability(False, "torch_xla found but no PJRT device selected (set PJRT_DEVICE=TPU)")
        if str(device_type).upper() != "TPU":
            return Availability(False, f"torch_xla found but PJRT device is {device_type}, not TPU")
        try:
            count = xr.global_runtime_device_count()
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"PJRT TPU runtime failed to start: {_one_line(exc)}")
        if not count:
            return Availability(False, "torch_xla found but no TPU device visible")
        return Availability(True)

    def device(self, index: int = 0):
        import torch_xla.core.xla_model as xm

        return xm.xla_device(index)

    def memory_info(self, index: int = 0) -> MemoryInfo:
        import torch_xla.core.xla_model as xm

        info = xm.get_memory_info(self.device(index))
        if "bytes_limit" in info:  # torch_xla >= 2.1
            total = int(info["bytes_limit"])
            return MemoryInfo(free=total - int(info["bytes_used"]), total=total)
        return MemoryInfo(free=int(info["kb_free"]) * 1024, total=int(info["kb_total"]) * 1024)

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.mark_step()
        xm.wait_device_ops()

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
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = _one_line(exc)
        return facts
