"""The platform interface: what the core asks of a device, and nothing vendor-specific.

A plugin subclasses :class:`Platform` and returns an instance from the
``tokenmill_platforms`` hook. The core never branches on a platform's identity; it
reads :class:`Capabilities` and calls these methods.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Availability:
    """Whether a platform can run here, and why not when it cannot."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class Capabilities:
    """What a platform declares it can do; the conformance suite checks each flag.

    ``dtypes`` are torch dtype names (``"float32"``, ``"bfloat16"``, ``"float16"``).
    ``fp8``: float8 tensors and matmuls on the device.
    ``graphs``: :meth:`Platform.capture_graph` captures device work once for replay.
    ``static_shapes``: every new input shape compiles a new graph, so the model runner pads
    each step to shape buckets (:mod:`tokenmill.engine.buckets`); :meth:`Platform.compile_count`
    reports the compilations.
    ``pinned_memory``: :meth:`Platform.pin_memory` page-locks host memory for swapping KV blocks.
    ``async_execution``: the device computes a step while the host thread goes on (a queue of
    launched work, as on GPUs and XLA), so the engine's overlap scheduler, which plans step N+1
    while N runs, hides the host's work; it is on by default only where this is declared. Where
    the host's own cores compute the forward (the cpu platform) the overlapping host work takes
    cores from the forward instead.
    """

    dtypes: tuple[str, ...] = ("float32",)
    fp8: bool = False
    graphs: bool = False
    static_shapes: bool = False
    pinned_memory: bool = False
    async_execution: bool = False


@dataclass(frozen=True)
class MemoryInfo:
    """Free and total bytes of the device's memory, as the device's own API reports them."""

    free: int
    total: int


class Platform:
    """A device family. Subclasses set the class attributes and override the methods.

    ``name`` is the ``--device`` value and the key under which kernels and attention
    backends register (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"xpu"``, ``"tpu"``).
    ``torch_device_type`` is torch's name for the device (``"cuda"`` also for a HIP build
    of torch, ``"xla"`` for an XLA backend). ``priority`` orders platforms for ``--device auto``.
    ``dist_backend`` is the ``torch.distributed`` backend name the tensor-parallel ranks use.
    ``ray_resource`` is the Ray resource one rank reserves on a node (``"CPU"``, ``"GPU"``,
    ``"TPU"``) when the ranks run as Ray actors.
    """

    name: str = ""
    torch_device_type: str = "cpu"
    priority: int = 0
    dist_backend: str = "gloo"
    ray_resource: str = "CPU"
    capabilities: Capabilities = Capabilities()
    #: Set by the plugin manager: the distribution and version that registered this platform.
    plugin_name: str = ""
    plugin_version: str = ""

    def availability(self) -> Availability:
        """Whether this platform can run here; must not raise."""
        raise NotImplementedError

    def device(self, index: int = 0):
        """The torch.device to run on."""
        import torch

        if self.torch_device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.torch_device_type, index)

    def memory_info(self) -> MemoryInfo:
        """Free and total memory of the device, in bytes."""
        raise NotImplementedError

    def allocate(self, shape: tuple[int, ...], dtype) -> Any:
        """Allocate a zeroed tensor on the device (the KV pool goes through here)."""
        import torch

        return torch.zeros(shape, dtype=dtype, device=self.device())

    def kv_cache_budget(self, fraction: float) -> int:
        """Bytes the KV cache may take when the user gave no ``--kv-cache-memory``.

        The default is ``fraction`` of the device's free memory; host platforms override it
        to leave room for everything else living in the same RAM.
        """
        return int(self.memory_info().free * fraction)

    def free(self, tensor) -> None:
        """Release memory held for ``tensor`` back to the device (best effort)."""
        del tensor

    def synchronize(self) -> None:
        """Wait until the device has finished all queued work."""

    def pin_memory(self, tensor):
        """Return ``tensor`` in page-locked host memory when the platform supports it.

        Called by the model runner once per layer at start-up with ``--preemption-mode swap``,
        on a fresh host tensor in the attention backend's cache layout: the swap space that
        preempted blocks are copied to and from with ``copy_(non_blocking=True)``."""
        return tensor.pin_memory() if self.capabilities.pinned_memory else tensor

    def wrap_model(self, model):
        """Return the model to run: called once by the model runner, after the weights are
        loaded on :meth:`device` and before the KV cache is allocated. A platform may compile
        or trace it here; the default runs it as it is. A platform that gives some steps a
        path of its own that bypasses the model's modules sets ``model.fused_decode`` to the
        object serving them, whose ``run(input_ids, positions, kv_caches, meta)`` returns the
        hidden states or None (the modules serve the step): ``tokenmill bench profile`` times
        it as one component."""
        return model

    def inference_mode(self):
        """The autograd context every step runs in: ``torch.inference_mode()``, or ``torch.no_grad()``
        on devices whose tensors do not support inference mode."""
        import torch

        return torch.inference_mode()

    def step_end(self) -> None:
        """Called by the model runner once per step, after the forward and the logits and
        before anything is read back to the host (a lazy-tensor device cuts and launches its
        graph here). The default does nothing."""

    def compile_count(self) -> int | None:
        """Graphs the device compiler has compiled in this process so far, or None when the
        platform does not compile per input shape. A platform declaring ``static_shapes``
        must count them: the conformance suite bounds the count by the shape buckets."""
        return None

    def capture_graph(self, fn, pool=None):
        """Capture the device work of one call of ``fn`` into a graph (``capabilities.graphs``).

        Returns an object whose ``replay()`` re-runs the captured work on the same buffers
        and returns ``fn``'s outputs (refreshed in place). Called by the model runner
        (:mod:`tokenmill.engine.graphs`) once per decode batch-size bucket, on the first
        decode-only step of that size, with ``fn`` reading only static buffers that already
        hold that step's inputs and returning its logits ``[B, vocab]``; the runner then calls
        ``replay()`` for that step and every later one of the size. ``pool`` comes from
        :meth:`graph_pool`. An exception turns graphs off for the engine (it runs eagerly).
        """
        raise NotImplementedError(f"platform {self.name} does not capture graphs")

    def graph_pool(self):
        """A memory pool shared by the graphs :meth:`capture_graph` captures (None: none); called once,
        before the first capture."""
        return None

    def describe(self) -> dict:
        """Facts for ``tokenmill plugins``; cheap, never raises."""
        return {}

    def __repr__(self) -> str:
        return f"<Platform {self.name} ({self.torch_device_type}) priority={self.priority}>"


def host_memory_info() -> MemoryInfo:
    """Free and total host memory from /proc/meminfo (falls back to sysconf)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return MemoryInfo(free=fields.get("MemAvailable", fields["MemFree"]), total=fields["MemTotal"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(free=free * size, total=pages * size)
