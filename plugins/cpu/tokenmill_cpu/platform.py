"""The CPU platform: always available, the fallback of ``--device auto``.

KV cache budget: host RAM also holds the weights, activations, the API process and
everything else on the machine, so the cpu platform does not take most of free memory.
``TOKENMILL_CPU_KVCACHE_SPACE=GiB`` (like vLLM's ``VLLM_CPU_KVCACHE_SPACE``) fixes the
budget; otherwise it is ``fraction`` of half the available RAM, capped at
:data:`DEFAULT_KV_CAP`. ``--kv-cache-memory`` (any platform) overrides both.
"""
from __future__ import annotations

import logging
import os
import sys

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info

log = logging.getLogger(__name__)
ENV_KV_SPACE = "TOKENMILL_CPU_KVCACHE_SPACE"
#: Largest default KV budget (bytes) when ``TOKENMILL_CPU_KVCACHE_SPACE`` is not set.
DEFAULT_KV_CAP = 4 << 30

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

    def kv_cache_budget(self, fraction: float) -> int:
        """``TOKENMILL_CPU_KVCACHE_SPACE`` GiB if set, else ``min(fraction * available / 2, 4 GiB)``."""
        mem = self.memory_info()
        text = os.environ.get(ENV_KV_SPACE, "").strip()
        if not text:
            return max(1, min(int(mem.free * fraction / 2), DEFAULT_KV_CAP))
        try:
            gib = float(text)
        except ValueError:
            gib = float("nan")
        if not 0 < gib < float("inf"):
            raise ValueError(f"{ENV_KV_SPACE} must be a positive number of GiB, got {text!r}")
        budget = int(gib * (1 << 30))
        if budget > mem.total:
            raise ValueError(f"{ENV_KV_SPACE}={text} GiB exceeds this host's memory "
                             f"({mem.total / (1 << 30):.1f} GiB)")
        if budget > mem.free:
            log.warning("tokenmill-cpu: %s=%s GiB is more than the available memory (%.1f GiB)", ENV_KV_SPACE,
                        text, mem.free / (1 << 30))
        return budget

    def wrap_model(self, model):
        """Give Llama-family models the one-call decode step (:mod:`tokenmill_cpu.fused_decode`) where it
        applies, and set up this process's allocator for the steps (:mod:`tokenmill_cpu.allocator`)."""
        from tokenmill_cpu.allocator import configure_allocator
        from tokenmill_cpu.fused_decode import install

        configure_allocator()

        why = install(model)
        log.info("tokenmill-cpu: decode steps %s", "in one C call" if why is None else f"per op ({why})")
        return model

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
