"""intel-extension-for-pytorch (IPEX) on the CPU: used when it imports and matches torch, else skipped.

IPEX refuses to run on a torch whose major.minor differs from its own, so the version is
compared before anything imports it; then it is imported once (IPEX 2.8 fails to import
next to transformers 5, for one), and any failure is the reason it is skipped.
:func:`ipex_status` says which case holds; ``tokenmill plugins`` and the conformance report
show it. ``TOKENMILL_CPU_IPEX=0`` keeps IPEX out even when it is usable (to compare paths).

What IPEX serves when usable: RMSNorm (``rms_norm``, ``fused_add_rms_norm``, from
``ipex.llm.functional``) and paged attention (:mod:`tokenmill_cpu.ipex_attention`). Every
call into IPEX is counted in :data:`CALLS`, so the conformance report can say which IPEX
ops actually ran rather than which were registered.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter
from importlib import metadata

log = logging.getLogger(__name__)
MODULE, DIST = "intel_extension_for_pytorch", "intel-extension-for-pytorch"
ENV_IPEX = "TOKENMILL_CPU_IPEX"
#: IPEX op name -> calls made in this process (through :func:`counted`).
CALLS: Counter = Counter()

_loaded: dict = {}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+", 1)[0].split(".")[:2])


def _import_ipex():
    """``(module or None, error or None)``; imported once per process."""
    if "result" not in _loaded:
        try:
            import intel_extension_for_pytorch as ipex

            _loaded["result"] = (ipex, None)
        except Exception as exc:  # noqa: BLE001 - any import failure means: do not use IPEX
            first = (str(exc).strip().splitlines() or [""])[0]
            _loaded["result"] = (None, f"{type(exc).__name__}: {first}")
    return _loaded["result"]


def ipex_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether IPEX can be used with this torch, and why not."""
    if os.environ.get(ENV_IPEX, "").strip() == "0":
        return False, f"{ENV_IPEX}=0: intel-extension-for-pytorch not used (torch paths serve)"
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
    module, error = _import_ipex()
    if module is None:
        return False, f"intel-extension-for-pytorch {version} failed to import ({error}); skipped"
    return True, f"intel-extension-for-pytorch {version}"


def load_ipex():
    """The imported IPEX module when :func:`ipex_status` says it is usable, else None (reason logged)."""
    usable, reason = ipex_status()
    if not usable:
        log.info("tokenmill-cpu: %s", reason)
        return None
    return _import_ipex()[0]


def counted(name: str, fn):
    """``fn`` with each call counted in :data:`CALLS` under ``name``."""
    def call(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


#: The dtypes IPEX's RMSNorm serves (its float32 result matches the reference to rounding; in
#: half precision it rounds once where the contract rounds twice: within one ulp).
NORM_DTYPES = ("float32", "bfloat16", "float16")


def ipex_kernels(provider: str, ipex=None) -> list:
    """IPEX's RMSNorm ops as :class:`KernelImpl` s for the cpu platform; none when IPEX is not usable.

    ``ipex`` is the IPEX module to take the ops from (default: :func:`load_ipex`).
    """
    ipex = ipex if ipex is not None else load_ipex()
    if ipex is None:
        return []
    from tokenmill.ops.registry import KernelImpl

    functional = ipex.llm.functional
    norm = counted("rms_norm", functional.rms_norm)
    add_norm = counted("add_rms_norm", functional.add_rms_norm)

    def rms_norm(x, weight, eps):
        return norm(x, weight, eps)

    def fused_add_rms_norm(x, residual, weight, eps):
        # add_back=True writes x + residual into its first argument: a fresh copy (ops are functional)
        new_residual = residual.clone()
        return add_norm(new_residual, x, weight, None, eps, True), new_residual

    return [KernelImpl(op, "cpu", fn, provider=f"{provider}+ipex", priority=20, dtypes=NORM_DTYPES)
            for op, fn in (("rms_norm", rms_norm), ("fused_add_rms_norm", fused_add_rms_norm))]


def summary() -> str:
    """The IPEX ops called in this process and how often, for reports."""
    if not CALLS:
        return "none called"
    return ", ".join(f"{op} x{n}" for op, n in sorted(CALLS.items()))
