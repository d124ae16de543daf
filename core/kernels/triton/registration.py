"""What a plugin registers to use the shared Triton kernels for its platform (cheap: no Triton import)."""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)

#: Ops the shared Triton kernels implement; every other op falls back to the reference.
TRITON_OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")
#: Above the reference ops, below a vendor library a plugin may register for the same op.
TRITON_PRIORITY = 10


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _lazy(module: str, name: str):
    """A plain function that imports ``tokenmill.kernels.triton.<module>`` (and Triton) on its first call."""
    target = None

    def call(*args, **kwargs):
        nonlocal target
        if target is None:
            target = getattr(importlib.import_module(f"tokenmill.kernels.triton.{module}"), name)
        return target(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Triton kernel for the {name!r} op (tokenmill.kernels.triton.{module})."
    return call


_OP_MODULES = {"rms_norm": "norm", "fused_add_rms_norm": "norm", "rotary_embedding": "rotary",
               "silu_and_mul": "activation"}


def kernel_impls(platform_name: str, provider: str, priority: int = TRITON_PRIORITY,
                 dtypes: tuple[str, ...] | None = None) -> list:
    """:class:`~tokenmill.ops.registry.KernelImpl` of every shared Triton op for ``platform_name``.

    Empty (with a log line) when Triton is not installed, so the reference ops serve.
    """
    from tokenmill.ops.registry import KernelImpl

    if not triton_available():
        log.info("%s: triton is not installed; the reference ops serve platform %s", provider, platform_name)
        return []
    return [KernelImpl(op, platform_name, _lazy(_OP_MODULES[op], op), provider=provider, priority=priority,
                       dtypes=dtypes) for op in TRITON_OPS]


def quant_methods(platform_name: str, priority: int = TRITON_PRIORITY) -> list:
    """Subclasses of the Triton quantization methods (:mod:`.quant`) serving ``platform_name``.

    GPTQ, AWQ, ``int8``/``w8a8`` and FP8 (FP8 only where the platform's ``capabilities.fp8``
    is true), above the core's reference classes. Empty when Triton is not installed.
    """
    if not triton_available():
        return []
    from tokenmill.kernels.triton.quant import TRITON_QUANT_CLASSES

    return [type(f"{cls.__name__}_{platform_name}", (cls,),
                 {"device_types": (platform_name,), "priority": priority, "__module__": cls.__module__,
                  "__doc__": f"{cls.__doc__} Registered for platform {platform_name!r}."})
            for cls in TRITON_QUANT_CLASSES]


def attention_backend(platform_name: str, priority: int | None = None) -> type | None:
    """A subclass of :class:`~tokenmill.kernels.triton.backend.TritonAttention` serving ``platform_name``.

    ``None`` when Triton is not installed (filter it out of the hook's list).
    """
    from tokenmill.kernels.triton.backend import TritonAttention

    if not triton_available():
        return None
    attrs = {"device_types": (platform_name,), "name": f"triton-{platform_name}",
             "__doc__": f"The shared Triton paged attention, registered for platform {platform_name!r}."}
    if priority is not None:
        attrs["priority"] = priority
    return type(f"TritonAttention_{platform_name}", (TritonAttention,), attrs)
