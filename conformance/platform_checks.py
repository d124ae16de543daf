"""Checks of the platform contract (:class:`tokenmill.platform.Platform`), one platform at a time.

What a platform owes the engine: an ``availability()`` that answers without raising, a
device to compute on, memory figures, a KV pool it allocates (zeroed) and frees, a
``synchronize()``, the name of a ``torch.distributed`` backend, and capability flags
that are true. A platform that is not available here has every check but the first
two skipped, with its own reason.
"""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo

from tokenmill.conformance.results import Check, Skip

KNOWN_DTYPES = ("float32", "float16", "bfloat16")
KNOWN_DIST_BACKENDS = ("gloo", "nccl", "xccl", "xla", "mpi", "ucc", "hccl", "ccl")
#: torch.distributed backends that torch itself can report on without a vendor import.
TORCH_DIST_BACKENDS = ("gloo", "nccl", "xccl", "mpi", "ucc")
KV_POOL_SHAPE = (2, 8, 16, 2, 64)


def _available(platform) -> None:
    avail = platform.availability()
    if not avail:
        raise Skip(f"platform {platform.name} is not available here: {avail.reason}")


def platform_checks(target, platform) -> list[Check]:
    """Every platform-contract check for ``platform`` (registered by the plugin under test)."""
    name = platform.name
    import torch

    def availability():
        avail = platform.availability()
        assert isinstance(avail, Availability), f"availability() returned {type(avail).__name__}, not Availability"
        if not avail:
            assert avail.reason.strip(), "an unavailable platform must say why (Availability.reason is empty)"
            return f"unavailable here: {avail.reason}"
        return "available"

    def attributes():
        assert name and name.strip() == name and " " not in name, f"platform name {name!r} must be one word"
        assert isinstance(platform.torch_device_type, str) and platform.torch_device_type, "torch_device_type unset"
        assert isinstance(platform.priority, int), f"priority must be an int, got {type(platform.priority).__name__}"
        caps = platform.capabilities
        assert isinstance(caps, Capabilities), f"capabilities is {type(caps).__name__}, not Capabilities"
        assert caps.dtypes, "capabilities.dtypes is empty"
        unknown = [d for d in caps.dtypes if d not in KNOWN_DTYPES]
        assert not unknown, f"capabilities.dtypes lists unknown dtypes {unknown}; known: {list(KNOWN_DTYPES)}"
        facts = platform.describe()
        assert isinstance(facts, dict), f"describe() returned {type(facts).__name__}, not dict"
        return f"device type {platform.torch_device_type}, priority {platform.priority}, dtypes {list(caps.dtypes)}"

    def device():
        _available(platform)
        dev = platform.device()
        assert isinstance(dev, torch.device), f"device() returned {type(dev).__name__}, not torch.device"
        assert dev.type == platform.torch_device_type, \
            f"device() is of type {dev.type!r} but torch_device_type is {platform.torch_device_type!r}"
        x = torch.arange(8, dtype=torch.float32, device=dev)
        assert (x * 2).sum().item() == 56.0, "arithmetic on the device gave a wrong answer"
        return str(dev)

    def memory_info():
        _available(platform)
        info = platform.memory_info()
        assert isinstance(info, MemoryInfo), f"memory_info() returned {type(info).__name__}, not MemoryInfo"
        assert isinstance(info.free, int) and isinstance(info.total, int), "free and total must be ints (bytes)"
        assert 0 < info.total, f"total memory {info.total} must be positive"
        assert 0 <= info.free <= info.total, f"free {info.free} must lie in [0, total={info.total}]"
        budget = platform.kv_cache_budget(0.5)
        assert isinstance(budget, int) and 0 < budget <= info.total, \
            f"kv_cache_budget(0.5) = {budget!r} must be a positive int no larger than total memory"
        return f"free {info.free / 2**30:.1f} GiB of {info.total / 2**30:.1f} GiB; KV budget at 0.5: {budget / 2**30:.1f} GiB"

    def kv_pool():
        _available(platform)
        done = []
        for dtype_name in platform.capabilities.dtypes:
            dtype = getattr(torch, dtype_name)
            pool = platform.allocate(KV_POOL_SHAPE, dtype)
            assert isinstance(pool, torch.Tensor), f"allocate() returned {type(pool).__name__}, not a tensor"
            assert tuple(pool.shape) == KV_POOL_SHAPE, f"allocate() gave shape {tuple(pool.shape)}, asked {KV_POOL_SHAPE}"
            assert pool.dtype == dtype, f"allocate() gave dtype {pool.dtype}, asked {dtype}"
            assert pool.device.type == platform.torch_device_type, \
                f"allocate() put the pool on {pool.device}, not on a {platform.torch_device_type} device"
            assert int(torch.count_nonzero(pool).item()) == 0, "allocate() must return a zeroed pool"
            pool[1, 3, 5] = 1.5
            assert pool[1, 3, 5].float().sum().item() == 1.5 * KV_POOL_SHAPE[-2] * KV_POOL_SHAPE[-1], \
                "writing into the pool and reading back gave another value"
            platform.synchronize()
            platform.free(pool)
            del pool
            done.append(dtype_name)
        return f"allocated, written and freed a {KV_POOL_SHAPE} pool in {', '.join(done)}"

    def synchronize():
        _available(platform)
        dev = platform.device()
        x = torch.randn(64, 64, device=dev)
        y = x @ x
        platform.synchronize()
        assert torch.isfinite(y).all().item(), "matmul before synchronize() produced non-finite values"

    def dist_backend():
        backend = platform.dist_backend
        assert isinstance(backend, str) and backend, "dist_backend must name a torch.distributed backend"
        assert backend in KNOWN_DIST_BACKENDS, f"dist_backend {backend!r} is not one of {list(KNOWN_DIST_BACKENDS)}"
        _available(platform)
        import torch.distributed as dist

        if not dist.is_available():
            raise Skip("this torch build has no torch.distributed")
        check = getattr(dist, "is_backend_available", None)
        if backend not in TORCH_DIST_BACKENDS or check is None:
            return f"{backend} (registered by the vendor library; not checked here)"
        assert check(backend), f"dist_backend {backend!r} is not available in this torch build"
        return backend

    def dtypes():
        _available(platform)
        dev = platform.device()
        for dtype_name in platform.capabilities.dtypes:
            dtype = getattr(torch, dtype_name)
            a = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
            b = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
            got = (a.to(dev, dtype) @ b.to(dev, dtype)).float().cpu()
            want = a.to(dtype).float() @ b.to(dtype).float()
            assert torch.allclose(got, want, atol=0.25, rtol=0.05), \
                f"a {dtype_name} matmul on the device is off by {(got - want).abs().max().item():.3g}"
        return f"{', '.join(platform.capabilities.dtypes)} compute on the device"

    def fp8():
        if not platform.capabilities.fp8:
            raise Skip("fp8 not declared")
        _available(platform)
        dtype = getattr(torch, "float8_e4m3fn", None)
        assert dtype is not None, "fp8 declared but this torch has no float8_e4m3fn"
        x = torch.tensor([0.5, -1.0, 2.0, 448.0], device=platform.device())
        back = x.to(dtype).float().cpu()
        assert back.tolist() == [0.5, -1.0, 2.0, 448.0], f"float8_e4m3fn round trip gave {back.tolist()}"
        return "float8_e4m3fn round-trips on the device"

    def pinned_memory():
        x = torch.ones(16)
        if not platform.capabilities.pinned_memory:
            y = platform.pin_memory(x)
            assert y is x or torch.equal(y, x), "pin_memory() of a platform without pinned memory must return the tensor"
            raise Skip("pinned memory not declared")
        _available(platform)
        y = platform.pin_memory(x)
        assert torch.equal(y.cpu(), x), "pin_memory() changed the values"
        assert y.is_pinned(), "pinned_memory declared but pin_memory() did not return a pinned tensor"
        from tokenmill.conformance.e2e_checks import swap_check

        return "pin_memory() returns page-locked host memory; " + swap_check(target, platform)

    def graphs():
        if not platform.capabilities.graphs:
            raise Skip("graph capture not declared")
        _available(platform)
        dev = platform.device()
        static = torch.zeros(8, device=dev)
        graph = platform.capture_graph(lambda: static * 2 + 1, pool=platform.graph_pool())
        for step in range(2):
            static.copy_(torch.arange(8, dtype=torch.float32, device=dev) + step)
            out = graph.replay()
            platform.synchronize()
            assert out.cpu().tolist() == [2.0 * (i + step) + 1 for i in range(8)], \
                "a replayed graph computed the wrong values"
        from tokenmill.conformance.e2e_checks import graph_check

        return "capture_graph() replays on new inputs; " + graph_check(target, platform)

    def static_shapes():
        flag = platform.capabilities.static_shapes
        assert isinstance(flag, bool), "static_shapes must be a bool"
        if not flag:
            raise Skip("static shapes not declared: steps run unpadded")
        _available(platform)
        from tokenmill.conformance.e2e_checks import static_shape_check

        return static_shape_check(target, platform)

    def async_execution():
        flag = platform.capabilities.async_execution
        assert isinstance(flag, bool), "async_execution must be a bool"
        _available(platform)
        from tokenmill.conformance.e2e_checks import overlap_check

        return (("declared: overlap scheduling is on by default; " if flag else
                 "not declared: overlap is off by default, checked forced on; ") + overlap_check(target, platform))

    checks = [
        ("availability", "availability() answers without raising and says why when unavailable", availability),
        ("attributes", "name, device type, priority, capabilities and describe() are well formed", attributes),
        ("device", "device() is a torch.device of torch_device_type that computes", device),
        ("memory_info", "memory_info() reports 0 <= free <= total; kv_cache_budget() fits", memory_info),
        ("kv_pool", "allocate() returns a zeroed KV pool in each declared dtype; free() releases it", kv_pool),
        ("synchronize", "synchronize() waits for queued work", synchronize),
        ("dist_backend", "dist_backend names a torch.distributed backend available here", dist_backend),
        ("capability/dtypes", "each declared dtype computes on the device", dtypes),
        ("capability/fp8", "declared fp8: float8 tensors work on the device", fp8),
        ("capability/pinned_memory", "declared pinned memory: pin_memory() page-locks, and the engine swaps "
                                     "preempted blocks through page-locked host memory", pinned_memory),
        ("capability/graphs", "declared graphs: a graph captures and replays; the engine's replayed decode steps "
                              "give the eager engine's tokens", graphs),
        ("capability/async_execution", "the overlap scheduler (on by default where async execution is declared) "
                                       "plans ahead and gives the tokens of the engine without it", async_execution),
        ("capability/static_shapes", "declared static shapes: workload W compiles at most one graph per bucket "
                                     "used, and nothing when run again", static_shapes),
    ]
    return [Check(f"platform/{name}/{cid}", "platform", title, fn) for cid, title, fn in checks]
