"""The CPU platform: always available, the fallback of ``--device auto``."""
from __future__ import annotations

import os
import sys

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info

#: /proc/cpuinfo flags worth reporting: what decides which CPU kernels are fast.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[int | None, list[str]]:
    """``(physical cores or None, ISA flags of interest)`` parsed from a Linux cpuinfo file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None, []
    cores: set[tuple[str, str]] = set()
    flags: set[str] = set()
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
        # x86 calls them "flags", arm64 "Features"
        flags.update((fields.get("flags") or fields.get("Features") or "").split())
    return (len(cores) or None), [f for f in ISA_FLAGS if f in flags]


class CpuPlatform(Platform):
    """Torch on the host CPU; distributed through gloo; memory is the host's."""

    name = "cpu"
    torch_device_type = "cpu"
    priority = 0
    dist_backend = "gloo"
    # pinned_memory stays False: page-locking only helps a copy to an accelerator.
    capabilities = Capabilities(dtypes=("float32", "bfloat16", "float16"))

    def availability(self) -> Availability:
        return Availability(True)

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def describe(self) -> dict:
        physical, isa = read_cpuinfo()
        facts: dict = {
            "physical_cores": physical,
            "logical_cores": os.cpu_count(),
            "isa": isa,
        }
        if hasattr(os, "sched_getaffinity"):
            facts["usable_cores"] = len(os.sched_getaffinity(0))
        try:
            import torch

            facts["torch"] = torch.__version__
            facts["torch_threads"] = torch.get_num_threads()
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["torch"] = f"unavailable ({type(exc).__name__})"
        facts["python"] = sys.version.split()[0]
        return facts
