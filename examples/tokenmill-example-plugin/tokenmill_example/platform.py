"""The ``example`` platform: the host CPU under another name, as a stand-in for a real device.

It declares ``graphs`` to show the capture contract without a GPU: the host has no device
graphs, so :class:`RecordedGraph` records the callable the model runner hands to
:meth:`ExamplePlatform.capture_graph` and replays it by calling it again over the same
static buffers, refreshing the outputs of the capture in place. Like a device graph, a
replay sees only what the runner wrote into those buffers and the state the callable
captured (its metadata's host fields stay as they were at capture), so a runner that forgot
to reset a padded row, or a backend that read a host value, gives wrong tokens here too.
It makes nothing faster.
"""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info


class RecordedGraph:
    """A recorded ``fn`` whose :meth:`replay` re-runs it and refreshes the captured outputs in place."""

    def __init__(self, fn):
        self.fn = fn
        self.outputs = fn()
        self.replays = 0

    def replay(self):
        fresh = self.fn()
        if isinstance(self.outputs, (tuple, list)):
            for old, new in zip(self.outputs, fresh):
                old.copy_(new)
        else:
            self.outputs.copy_(fresh)
        self.replays += 1
        return self.outputs


class ExamplePlatform(Platform):
    """Computes on the host. ``--device example`` selects it; ``auto`` prefers the real CPU platform."""

    name = "example"
    torch_device_type = "cpu"
    priority = -20
    dist_backend = "gloo"
    capabilities = Capabilities(dtypes=("float32", "bfloat16"), graphs=True)

    def __init__(self):
        #: Every graph captured in this process (the conformance report counts them).
        self.captured: list[RecordedGraph] = []

    def capture_graph(self, fn, pool=None) -> RecordedGraph:
        graph = RecordedGraph(fn)
        self.captured.append(graph)
        return graph

    def availability(self) -> Availability:
        return Availability(True)

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def kv_cache_budget(self, fraction: float) -> int:
        return min(int(self.memory_info().free * fraction), 1 << 30)

    def describe(self) -> dict:
        return {"device": "host CPU (example plugin)"}
