"""The AMD ROCm platform: a HIP build of torch exposes AMD GPUs as ``torch.cuda``.

Collectives go through torch's ``nccl`` backend, which ROCm builds back with RCCL.
Everything device-generic comes from :class:`tokenmill.accelerator.AcceleratorPlatform`;
this module holds only what is AMD's: telling a HIP build apart and what a gfx
architecture implies (FP8 on MI300/MI350).
"""
from __future__ import annotations

from tokenmill.accelerator import AcceleratorPlatform
from tokenmill.platform import Capabilities

#: Architectures (gcnArchName prefixes) with hardware FP8: MI300 (gfx94x) and MI350 (gfx95x).
FP8_ARCH_PREFIXES = ("gfx94", "gfx95")


def gfx_arch(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


class RocmPlatform(AcceleratorPlatform):
    """AMD Instinct and Radeon GPUs through ROCm."""

    name = "rocm"
    torch_device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    ray_resource = "GPU"
    label = "ROCm (HIP)"
    graph_class = "CUDAGraph"  # HIP graphs, under torch.cuda's name

    def build_problem(self, torch) -> str | None:
        if not getattr(torch.version, "hip", None):
            return "torch built without ROCm (torch.version.hip is None)"
        return None

    def arch(self, index: int = 0) -> str:
        """The device's gfx architecture, e.g. ``"gfx942"``."""
        return gfx_arch(self.device_module().get_device_properties(index).gcnArchName)

    def probe_capabilities(self, available: bool) -> Capabilities:
        fp8 = available and self.arch(0).startswith(FP8_ARCH_PREFIXES)
        return Capabilities(dtypes=("float32", "float16", "bfloat16"), fp8=fp8, graphs=self.has_graphs(),
                            async_execution=True, static_shapes=False,
                            pinned_memory=True)

    def device_facts(self, index: int) -> dict:
        props = self.device_module().get_device_properties(index)
        return {"name": props.name, "arch": gfx_arch(props.gcnArchName), "total_memory": props.total_memory}

    def runtime_facts(self, torch) -> dict:
        return {"hip": getattr(torch.version, "hip", None)}
