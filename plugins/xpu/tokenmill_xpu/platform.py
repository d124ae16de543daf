"""The Intel XPU platform: ``torch.xpu`` (upstream torch), XCCL collectives, optional IPEX.

Everything device-generic (``torch.xpu`` memory, allocator, synchronisation, describe)
comes from :class:`tokenmill.accelerator.AcceleratorPlatform`; this module holds what is
Intel's: the XPU runtime facts and intel-extension-for-pytorch (IPEX). IPEX is optional
and heavy; it is imported only to register the ops it serves (:mod:`tokenmill_xpu.ipex_ops`),
never to answer availability or describe the platform.
"""
from __future__ import annotations

from tokenmill.accelerator import AcceleratorPlatform
from tokenmill.extensions import installed_version, major_minor
from tokenmill.platform import Capabilities

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"


def is_xpu_build(version: str) -> bool:
    """Whether an IPEX version is the XPU build (``+xpu``; the CPU build serves the cpu plugin)."""
    return "xpu" in version.partition("+")[2]


def ipex_status(torch_version: str | None) -> dict:
    """Whether IPEX is installed, whether its major.minor matches torch's (IPEX's own rule), and
    whether it is the XPU build (:func:`is_xpu_build`)."""
    version = installed_version(IPEX_MODULE, IPEX_DIST)
    if not version:
        return {"ipex": None if version is None else "unknown version", "ipex_matches_torch": None,
                "ipex_for_xpu": None}
    matches = None if torch_version is None else major_minor(version) == major_minor(torch_version)
    return {"ipex": version, "ipex_matches_torch": matches, "ipex_for_xpu": is_xpu_build(version)}


class XpuPlatform(AcceleratorPlatform):
    """Intel Data Center and Arc GPUs through torch.xpu."""

    name = "xpu"
    torch_device_type = "xpu"
    priority = 90
    dist_backend = "xccl"
    ray_resource = "GPU"
    label = "Intel XPU"
    graph_class = "XPUGraph"  # torch.xpu.XPUGraph (torch >= 2.11); has_graphs() checks this torch has it

    def probe_capabilities(self, available: bool) -> Capabilities:
        return Capabilities(dtypes=("float32", "float16", "bfloat16"), fp8=False, graphs=self.has_graphs(),
                            async_execution=True,
                            static_shapes=False, pinned_memory=True)

    def device_facts(self, index: int) -> dict:
        mod = self.device_module()
        props = mod.get_device_properties(index)
        return {"name": mod.get_device_name(index), "total_memory": props.total_memory}

    def runtime_facts(self, torch) -> dict:
        return {"xpu_runtime": getattr(torch.version, "xpu", None), **ipex_status(torch.__version__)}
