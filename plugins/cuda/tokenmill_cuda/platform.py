"""The NVIDIA CUDA platform: torch.cuda on a CUDA build of torch, NCCL for collectives."""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform


class CudaPlatform(Platform):
    """NVIDIA GPUs. FP8 needs compute capability 8.9 (Ada) or newer; bf16 needs 8.0."""

    name = "cuda"
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
        if not getattr(torch.version, "cuda", None):
            hint = " (this is a ROCm build: use --device rocm)" if getattr(torch.version, "hip", None) else ""
            return Availability(False, f"torch built without CUDA (torch.version.cuda is None){hint}")
        try:
            if not torch.cuda.is_available():
                return Availability(False, "no CUDA device visible")
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"CUDA initialisation failed: {type(exc).__name__}: {exc}")
        return Availability(True)

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            self._capabilities = self._probe_capabilities()
        return self._capabilities

    def _probe_capabilities(self) -> Capabilities:
        major, minor = 0, 0
        if self.availability():
            import torch

            major, minor = torch.cuda.get_device_capability(0)
        dtypes = ("float32", "float16", "bfloat16") if major >= 8 else ("float32", "float16")
        return Capabilities(dtypes=dtypes, fp8=(major, minor) >= (8, 9), graphs=True, static_shapes=False,
                            pinned_memory=True)

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
            facts["cuda_runtime"] = torch.version.cuda
            if self.availability():
                facts["device_count"] = torch.cuda.device_count()
                facts["devices"] = []
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    facts["devices"].append({"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                                             "total_memory": props.total_memory})
                try:
                    facts["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
                except Exception:  # noqa: BLE001 - NCCL is optional for one GPU
                    facts["nccl"] = None
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = f"{type(exc).__name__}: {exc}"
        return facts
