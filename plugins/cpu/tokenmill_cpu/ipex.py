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

import logging
import os
from collections import Counter

from tokenmill.extensions import optional_extension

log = logging.getLogger(__name__)
MODULE, DIST = "intel_extension_for_pytorch", "intel-extension-for-pytorch"
ENV_IPEX = "TOKENMILL_CPU_IPEX"
#: IPEX op name -> calls made in this process (through :func:`counted`).
CALLS: Counter = Counter()

#: The outcome of importing IPEX (see :func:`tokenmill.extensions.optional_extension`).
_loaded: dict = {}


def _ipex():
    """``(the IPEX module or None, reason)``."""
    if os.environ.get(ENV_IPEX, "").strip() == "0":
        return None, f"{ENV_IPEX}=0: intel-extension-for-pytorch not used (torch paths serve)"
    return optional_extension(MODULE, DIST, "torch paths serve", _loaded)


def ipex_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether IPEX can be used with this torch, and why not."""
    module, reason = _ipex()
    return module is not None, reason


def load_ipex():
    """The imported IPEX module when :func:`ipex_status` says it is usable, else None (reason logged)."""
    module, reason = _ipex()
    if module is None:
        log.info("tokenmill-cpu: %s", reason)
    return module


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
