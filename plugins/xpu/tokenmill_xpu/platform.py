"""The Intel XPU platform: ``torch.xpu`` (upstream torch), XCCL collectives, optional IPEX.

intel-extension-for-pytorch (IPEX) is optional and heavy; it is imported only by
:meth:`XpuPlatform.ipex`, never to answer availability or describe the platform.
"""
from __future__ import annotations

import importlib.util
from importlib import metadata

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+", 1)[0].split(".")[:2])


def ipex_status(torch_version: str | None) -> dict:
    """Whether IPEX is importable and whether its major.minor matches torch's (IPEX's own rule)."""
    if importlib.util.find_spec(IPEX_MODULE) is None:
        return {"ipex": None, "ipex_matches_torch": None}
    try:
        version = metadata.version(IPEX_DIST)
    except metadata.PackageNotFoundError:
        return {"ipex": "unknown version", "ipex_matches_torch": None}
    matches = None if torch_version is None else _major_minor(version) == _major_minor(torch_version)
    return {"ipex": version, "ipex_matches_torch": matches}


class XpuPlatform(Platform):
    """Intel Data Center and Arc GPUs through torch.xpu."""

    name = "xpu"
    torch_device_type = "xpu"
    priority = 90
    dist_backend = "xccl"
    ray_resource = "GPU"
    capabilities = Capabilities(dtypes=("float32", "float16", "bfloat16"), fp8=False, graphs=False,
                                static_shapes=False, pinned_memory=True)

    def availability(self) -> Availability:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - availability() never raises
            return Availability(False, f"torch failed to import: {type(exc).__name__}: {exc}")
        if not hasattr(torch, "xpu"):
            return Availability(False, f"torch {torch.__version__} has no torch.xpu module")
        try:
            if not torch.xpu.is_available():
                return Availability(False, "no Intel XPU device visible (torch.xpu.is_available() is False)")
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"XPU initialisation failed: {type(exc).__name__}: {exc}")
        return Availability(True)

    def memory_info(self, index: int = 0) -> MemoryInfo:
        import torch

        if hasattr(torch.xpu, "mem_get_info"):
            free, total = torch.xpu.mem_get_info(index)
            return MemoryInfo(free=int(free), total=int(total))
        total = torch.xpu.get_device_properties(index).total_memory
        return MemoryInfo(free=int(total - torch.xpu.memory_reserved(index)), total=int(total))

    def synchronize(self) -> None:
        import torch

        torch.xpu.synchronize()

    def free(self, tensor) -> None:
        import torch

        del tensor
        torch.xpu.empty_cache()

    def ipex(self):
        """The intel_extension_for_pytorch module (imported now), or None when it is not installed."""
        if importlib.util.find_spec(IPEX_MODULE) is None:
            return None
        import intel_extension_for_pytorch

        return intel_extension_for_pytorch

    def describe(self) -> dict:
        facts: dict = {}
        try:
            import torch

            facts["torch"] = torch.__version__
            facts["xpu_runtime"] = getattr(torch.version, "xpu", None)
            facts.update(ipex_status(torch.__version__))
            if self.availability():
                facts["device_count"] = torch.xpu.device_count()
                facts["devices"] = [torch.xpu.get_device_name(i) for i in range(torch.xpu.device_count())]
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
