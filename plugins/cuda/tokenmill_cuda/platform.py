"""The NVIDIA CUDA platform: a CUDA build of torch, NCCL collectives, CUDA graphs.

Everything device-generic (memory, allocator, synchronisation, graph capture, describe)
comes from :class:`tokenmill.accelerator.AcceleratorPlatform`; this module holds only
what is NVIDIA's: telling a CUDA build from a ROCm one, and what a compute capability
implies (bf16 from 8.0, FP8 from 8.9).
"""
from __future__ import annotations

from tokenmill.accelerator import AcceleratorPlatform
from tokenmill.platform import Capabilities


class CudaPlatform(AcceleratorPlatform):
    """NVIDIA GPUs. FP8 needs compute capability 8.9 (Ada) or newer; bf16 needs 8.0."""

    name = "cuda"
    torch_device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    ray_resource = "GPU"
    label = "CUDA"
    graph_class = "CUDAGraph"

    def build_problem(self, torch) -> str | None:
        if not getattr(torch.version, "cuda", None):
            hint = " (this is a ROCm build: use --device rocm)" if getattr(torch.version, "hip", None) else ""
            return f"torch built without CUDA (torch.version.cuda is None){hint}"
        return None

    def probe_capabilities(self, available: bool) -> Capabilities:
        major, minor = self.device_module().get_device_capability(0) if available else (0, 0)
        dtypes = ("float32", "float16", "bfloat16") if major >= 8 else ("float32", "float16")
        return Capabilities(dtypes=dtypes, fp8=(major, minor) >= (8, 9), graphs=self.has_graphs(),
                            async_execution=True, static_shapes=False,
                            pinned_memory=True)

    def device_facts(self, index: int) -> dict:
        props = self.device_module().get_device_properties(index)
        return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                "total_memory": props.total_memory}

    def runtime_facts(self, torch) -> dict:
        facts = {"cuda_runtime": torch.version.cuda}
        if self.availability():
            try:
                facts["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
            except Exception:  # noqa: BLE001 - NCCL is optional for one GPU
                facts["nccl"] = None
        return facts
