"""The AMD ROCm platform: a HIP build of torch exposes AMD GPUs as ``torch.cuda``.

Collectives go through torch's ``nccl`` backend, which ROCm builds back with RCCL.
"""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform

#: Architectures (gcnArchName prefixes) with hardware FP8: MI300 (gfx94x) and MI350 (gfx95x).
FP8_ARCH_PREFIXES = ("gfx94", "gfx95")


def gfx_arch(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


class RocmPlatform(Platform):
    """AMD Instinct and Radeon GPUs through ROCm."""

    name = "rocm"
    torch_device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    ray_resource = "GPU"

    def __init__(self):
        self._capabilities: Capabilities | None = None

    def availability(self) -> Availability:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - availability() never raises
            return Availability(False, f"torch failed to import: {type(exc).__name__}: {exc}")
        if not getattr(torch.version, "hip", None):
            return Availability(False, "torch built without ROCm (torch.version.hip is None)")
        try:
            if not torch.cuda.is_available():
                return Availability(False, "no ROCm (HIP) device visible")
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"HIP initialisation failed: {type(exc).__name__}: {exc}")
        return Availability(True)

    def arch(self, index: int = 0) -> str:
        """The device's gfx architecture, e.g. ``"gfx942"``."""
        import torch

        return gfx_arch(torch.cuda.get_device_properties(index).gcnArchName)

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            fp8 = bool(self.availability()) and self.arch(0).startswith(FP8_ARCH_PREFIXES)
            self._capabilities = Capabilities(dtypes=("float32", "float16", "bfloat16"), fp8=fp8, graphs=True,
                                              static_shapes=False, pinned_memory=True)
        return self._capabilities

    def memory_info(self, index: int = 0) -> MemoryInfo:
        import torch

        free, total = torch.cuda.mem_get_info(index)
        return MemoryInfo(free=int(free), total=int(total))

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()

    def free(self, tensor) -> None:
        import torch

        del tensor
        torch.cuda.empty_cache()

    def describe(self) -> dict:
        facts: dict = {}
        try:
            import torch

            facts["torch"] = torch.__version__
            facts["hip"] = getattr(torch.version, "hip", None)
            if self.availability():
                facts["device_count"] = torch.cuda.device_count()
                facts["devices"] = []
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    facts["devices"].append({"name": props.name, "arch": gfx_arch(props.gcnArchName),
                                             "total_memory": props.total_memory})
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
