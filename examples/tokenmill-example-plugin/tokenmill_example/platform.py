"""The ``example`` platform: the host CPU under another name, as a stand-in for a real device."""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info


class ExamplePlatform(Platform):
    """Computes on the host. ``--device example`` selects it; ``auto`` prefers the real CPU platform."""

    name = "example"
    torch_device_type = "cpu"
    priority = -20
    dist_backend = "gloo"
    capabilities = Capabilities(dtypes=("float32", "bfloat16"))

    def availability(self) -> Availability:
        return Availability(True)

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def kv_cache_budget(self, fraction: float) -> int:
        return min(int(self.memory_info().free * fraction), 1 << 30)

    def describe(self) -> dict:
        return {"device": "host CPU (example plugin)"}
