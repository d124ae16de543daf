"""The platform interface: what the core asks of a device, and nothing vendor-specific.

A plugin subclasses :class:`Platform` and returns an instance from the
``tokenmill_platforms`` hook. The core never branches on a platform's identity; it
reads :class:`Capabilities` and calls these methods.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Availability:
    """Whether a platform can run here, and why not when it cannot."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class Capabilities:
    """What a platform declares it can do; the conformance suite checks each flag.

    ``dtypes`` are torch dtype names (``"float32"``, ``"bfloat16"``, ``"float16"``).
    ``fp8``: float8 matmul support. ``graphs``: graph capture (CUDA graphs and the like).
    ``static_shapes``: every new input shape recompiles, so the runner should bucket shapes.
    ``pinned_memory``: page-locked host memory for swapping KV blocks.
    """

    dtypes: tuple[str, ...] = ("float32",)
    fp8: bool = False
    graphs: bool = False
    static_shapes: bool = False
    pinned_memory: bool = False


@dataclass(frozen=True)
class MemoryInfo:
    """Free and total bytes of the device's memory, as the device's own API reports them."""

    free: int
    total: int


class Platform:
    """A device family. Subclasses set the class attributes and override the methods.

    ``name`` is the ``--device`` value and the key under which kernels and attention
    backends register (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"xpu"``, ``"tpu"``).
    ``torch_device_type`` is torch's name for the device (``"cuda"`` for both NVIDIA and
    AMD, ``"xla"`` for TPU). ``priority`` orders platforms for ``--device auto``.
    ``dist_backend`` is the ``torch.distributed`` backend name the tensor-parallel ranks use.
    ``ray_resource`` is the Ray resource one rank reserves on a node (``"CPU"``, ``"GPU"``,
    ``"TPU"``) when the ranks run as Ray actors.
    """

    name: str = ""
    torch_device_type: str = "cpu"
    priority: int = 0
    dist_backend: str = "gloo"
    ray_resource: str = "CPU"
    capabilities: Capabilities = Capabilities()
    #: Set by the plugin manager: the distribution and version that registered this platform.
    plugin_name: str = ""
    plugin_version: str = ""

    def availability(self) -> Availability:
        """Whether this platform can run here; must not raise."""
        raise NotImplementedError

    def device(self, index: int = 0):
        """The torch.device to run on."""
        import torch

        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, index)

    def memory_info(self) -> MemoryInfo:
        """Free and total memory of the device, in bytes."""
        raise NotImplementedError

    def allocate(self, shape: tuple[int, ...], dtype) -> Any:
        """Allocate a zeroed tensor on the device (the KV pool goes through here)."""
        import torch

        return torch.zeros(shape, dtype=dtype, device=self.device())

    def kv_cache_budget(self, fraction: float) -> int:
        """Bytes the KV cache may take when the user gave no ``--kv-cache-memory``.

        The default is ``fraction`` of the device's free memory; host platforms override it
        to leave room for everything else living in the same RAM.
        """
        return int(self.memory_info().free * fraction)

    def free(self, tensor) -> None:
        """Release memory held for ``tensor`` back to the device (best effort)."""
        del tensor

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work."""

    def pin_memory(self, tensor):
        """Return ``tensor`` in page-locked host memory when the platform supports it."""
        return tensor.pin_memory() if self.capabilities.pinned_memory else tensor

    def describe(self) -> dict:
        """Facts for ``tokenmill plugins``; cheap, never raises."""
        return {}

    def __repr__(self) -> str:
        return f"<Platform {self.name} ({self.torch_device_type}) priority={self.priority}>"


def host_memory_info() -> MemoryInfo:
    """Free and total host memory from /proc/meminfo (falls back to sysconf)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return MemoryInfo(free=fields.get("MemAvailable", fields["MemFree"]), total=fields["MemTotal"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(free=free * size, total=pages * size)
