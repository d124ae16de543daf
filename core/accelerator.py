"""One base for GPU-like platforms, built on torch's device-generic APIs.

GPU-like device backends of torch expose the same interface through
``torch.get_device_module`` and ``torch.accelerator``: availability, device count and
properties, free/total memory, the caching allocator, synchronisation, streams, and (where
the backend has them) graphs. :class:`AcceleratorPlatform` implements the whole :class:`~tokenmill.platform.Platform`
contract on that interface; a vendor plugin subclasses it and supplies only what is
truly its own: how to tell its torch build apart (:meth:`~AcceleratorPlatform.build_problem`),
which dtypes and FP8 the device has (:meth:`~AcceleratorPlatform.probe_capabilities`),
the facts of one device (:meth:`~AcceleratorPlatform.device_facts`) and the distributed
backend name. Nothing here imports torch at module level: importing a plugin stays cheap.
"""
from __future__ import annotations

from typing import Any, Callable

from tokenmill.extensions import one_line
from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform


class CapturedGraph:
    """A captured device graph and the outputs it writes; :meth:`replay` re-runs the captured work."""

    def __init__(self, graph: Any, outputs: Any):
        self.graph = graph
        self.outputs = outputs

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class AcceleratorPlatform(Platform):
    """A platform whose device torch drives through ``torch.get_device_module(torch_device_type)``.

    Subclasses set ``name``, ``torch_device_type``, ``priority``, ``dist_backend`` and
    ``label`` (the vendor's name of the device family, for messages), and override
    :meth:`build_problem`, :meth:`probe_capabilities` and :meth:`device_facts` as needed.
    ``graph_class`` names the device module's graph class (a platform's graph API) when
    the backend can capture graphs; capture then goes through :meth:`capture_graph`.
    """

    label: str = "accelerator"
    #: Name of the graph class in the device module (``getattr(device_module(), graph_class)()``
    #: is captured under ``device_module().graph``); None: no graphs.
    graph_class: str | None = None

    def __init__(self):
        self._capabilities: Capabilities | None = None

    # -- vendor specifics (override) ------------------------------------------------------------
    def build_problem(self, torch) -> str | None:
        """Why this torch build cannot drive the vendor's devices (None when it can)."""
        return None

    def probe_capabilities(self, available: bool) -> Capabilities:
        """The device's capabilities; called once, with whether the platform is available."""
        return Capabilities(dtypes=("float32", "float16", "bfloat16"), graphs=self.has_graphs(),
                            async_execution=True, pinned_memory=True)

    def has_graphs(self) -> bool:
        """Whether this torch's device module has :attr:`graph_class` (and the ``graph`` context to capture with)."""
        if self.graph_class is None:
            return False
        try:
            mod = self.device_module()
        except Exception:  # noqa: BLE001 - a torch without the module has no graphs
            return False
        return hasattr(mod, self.graph_class) and hasattr(mod, "graph")

    def device_facts(self, index: int) -> dict:
        """Facts about device ``index`` for :meth:`describe` (name and memory by default)."""
        props = self.device_module().get_device_properties(index)
        return {"name": props.name, "total_memory": props.total_memory}

    def runtime_facts(self, torch) -> dict:
        """Version facts of the vendor runtime for :meth:`describe`."""
        return {}

    # -- the shared implementation --------------------------------------------------------------
    def device_module(self):
        """The device module of ``torch_device_type`` (``torch.<torch_device_type>``)."""
        import torch

        return torch.get_device_module(self.torch_device_type)

    def availability(self) -> Availability:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - availability() never raises
            return Availability(False, f"torch failed to import: {one_line(exc)}")
        problem = self.build_problem(torch)
        if problem:
            return Availability(False, problem)
        # (torch.get_device_module caches its answer; ask torch itself whether the module exists)
        if getattr(torch, self.torch_device_type, None) is None:
            return Availability(False, f"torch {torch.__version__} has no torch.{self.torch_device_type} module")
        mod = self.device_module()
        try:
            if not mod.is_available():
                return Availability(False, f"no {self.label} device visible "
                                           f"(torch.{self.torch_device_type}.is_available() is False)")
        except Exception as exc:  # noqa: BLE001
            return Availability(False, f"{self.label} initialisation failed: {one_line(exc)}")
        return Availability(True)

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            self._capabilities = self.probe_capabilities(bool(self.availability()))
        return self._capabilities

    def memory_info(self, index: int = 0) -> MemoryInfo:
        mod = self.device_module()
        if hasattr(mod, "mem_get_info"):
            free, total = mod.mem_get_info(index)
            return MemoryInfo(free=int(free), total=int(total))
        # Backends without a driver query: what the caching allocator has not reserved.
        total = int(mod.get_device_properties(index).total_memory)
        return MemoryInfo(free=max(0, total - int(mod.memory_reserved(index))), total=total)

    def synchronize(self) -> None:
        import torch

        accel = getattr(torch, "accelerator", None)
        if accel is not None and hasattr(accel, "synchronize"):
            accel.synchronize()
        else:
            self.device_module().synchronize()

    def free(self, tensor) -> None:
        del tensor
        self.device_module().empty_cache()

    def capture_graph(self, fn: Callable[[], Any], pool: Any = None) -> CapturedGraph:
        """Warm ``fn`` up on a side stream, capture one call into a device graph, return it.

        ``fn`` reads and writes only tensors that stay alive (static buffers); its return
        value is the graph's output, refreshed by every :meth:`CapturedGraph.replay`.
        ``pool`` is a memory-pool handle from :meth:`graph_pool` shared between captures.
        """
        if self.graph_class is None or not self.capabilities.graphs:
            raise NotImplementedError(f"platform {self.name} does not capture graphs")
        mod = self.device_module()
        side = mod.Stream()
        side.wait_stream(mod.current_stream())
        with mod.stream(side):
            for _ in range(2):  # the first calls may allocate workspaces or autotune
                fn()
        mod.current_stream().wait_stream(side)
        graph = getattr(mod, self.graph_class)()
        with mod.graph(graph, pool=pool):
            outputs = fn()
        return CapturedGraph(graph, outputs)

    def graph_pool(self) -> Any:
        """A memory-pool handle for :meth:`capture_graph`, so that captured graphs share memory."""
        return self.device_module().graph_pool_handle()

    def describe(self) -> dict:
        facts: dict = {}
        try:
            import torch

            facts["torch"] = torch.__version__
            facts.update(self.runtime_facts(torch))
            if self.availability():
                mod = self.device_module()
                facts["device_count"] = mod.device_count()
                facts["devices"] = [self.device_facts(i) for i in range(mod.device_count())]
        except Exception as exc:  # noqa: BLE001 - describe() never raises
            facts["error"] = one_line(exc)
        return facts
