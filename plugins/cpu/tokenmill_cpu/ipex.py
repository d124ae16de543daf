"""intel-extension-for-pytorch (IPEX): used when importable and built for this torch, else skipped.

IPEX refuses to run on a torch whose major.minor differs from its own, so the check
compares versions before importing it. :func:`ipex_status` says which case holds;
``tokenmill plugins`` and the conformance report show it.
"""
from __future__ import annotations

import importlib.util
import logging
from importlib import metadata

log = logging.getLogger(__name__)
MODULE, DIST = "intel_extension_for_pytorch", "intel-extension-for-pytorch"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+", 1)[0].split(".")[:2])


def ipex_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether IPEX can be used with this torch, and why not."""
    if importlib.util.find_spec(MODULE) is None:
        return False, "intel-extension-for-pytorch is not installed; skipped (torch paths serve)"
    try:
        import torch

        version = metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return False, "intel-extension-for-pytorch found without package metadata; skipped"
    if _major_minor(version) != _major_minor(torch.__version__):
        return False, (f"intel-extension-for-pytorch {version} does not match torch {torch.__version__}; "
                       f"skipped (torch paths serve)")
    return True, f"intel-extension-for-pytorch {version}"


def ipex_kernels(provider: str) -> list:
    """IPEX's fused RMSNorm for the cpu platform (float32 and bfloat16), when IPEX is usable."""
    usable, reason = ipex_status()
    if not usable:
        log.info("tokenmill-cpu: %s", reason)
        return []
    from tokenmill.ops.registry import KernelImpl

    def rms_norm(x, weight, eps):
        import intel_extension_for_pytorch as ipex

        return ipex.llm.functional.rms_norm(x, weight, eps)

    return [KernelImpl("rms_norm", "cpu", rms_norm, provider=f"{provider}+ipex", priority=20,
                       dtypes=("float32",))]
