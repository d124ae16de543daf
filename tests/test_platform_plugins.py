"""Detection logic of the five platform plugins, with the vendor stacks faked where this machine lacks them."""
from __future__ import annotations

import sys
import types

import pytest

torch = pytest.importorskip("torch")

from tokenmill_cpu.platform import CpuPlatform, read_cpuinfo  # noqa: E402
from tokenmill_cuda.platform import CudaPlatform  # noqa: E402
from tokenmill_rocm.platform import RocmPlatform, gfx_arch  # noqa: E402
from tokenmill_tpu.platform import TpuPlatform  # noqa: E402
from tokenmill_xpu.platform import XpuPlatform, ipex_status  # noqa: E402

from tokenmill.platform import Platform  # noqa: E402


def test_static_attributes():
    expected = {
        CpuPlatform: ("cpu", "cpu", 0, "gloo"),
        CudaPlatform: ("cuda", "cuda", 100, "nccl"),
        RocmPlatform: ("rocm", "cuda", 100, "nccl"),
        XpuPlatform: ("xpu", "xpu", 90, "xccl"),
        TpuPlatform: ("tpu", "xla", 80, "xla"),
    }
    for cls, (name, device_type, priority, dist) in expected.items():
        p = cls()
        assert isinstance(p, Platform)
        assert (p.name, p.torch_device_type, p.priority, p.dist_backend) == (name, device_type, priority, dist)
    assert TpuPlatform().capabilities.static_shapes is True
    assert CpuPlatform().capabilities.dtypes == ("float32", "bfloat16", "float16")


# -- cpu ---------------------------------------------------------------------------------------

def test_cpu_is_available_with_host_memory_and_facts():
    cpu = CpuPlatform()
    assert cpu.availability()
    mem = cpu.memory_info()
    assert 0 < mem.free <= mem.total
    facts = cpu.describe()
    assert facts["logical_cores"] >= 1
    assert facts["torch_threads"] == torch.get_num_threads()
    assert isinstance(facts["isa"], list)
    assert cpu.device() == torch.device("cpu")
    assert cpu.allocate((2, 3), torch.float32).shape == (2, 3)


def test_cpu_kv_budget_default_is_bounded_and_env_sets_it(monkeypatch):
    from tokenmill.platform import MemoryInfo
    from tokenmill_cpu import platform as cpu_platform

    cpu = CpuPlatform()
    monkeypatch.delenv(cpu_platform.ENV_KV_SPACE, raising=False)
    monkeypatch.setattr(cpu, "memory_info", lambda: MemoryInfo(free=20 << 30, total=24 << 30))
    assert cpu.kv_cache_budget(0.9) == cpu_platform.DEFAULT_KV_CAP == 4 << 30  # capped, not 18 GiB
    monkeypatch.setattr(cpu, "memory_info", lambda: MemoryInfo(free=2 << 30, total=4 << 30))
    assert cpu.kv_cache_budget(0.9) == int((2 << 30) * 0.9 / 2)  # small host: half of the fraction
    monkeypatch.setenv(cpu_platform.ENV_KV_SPACE, "1.5")
    assert cpu.kv_cache_budget(0.9) == 3 << 29
    for bad in ("0", "-1", "lots", "nan", "inf", "5"):  # 5 GiB > the 4 GiB host
        monkeypatch.setenv(cpu_platform.ENV_KV_SPACE, bad)
        with pytest.raises(ValueError, match=cpu_platform.ENV_KV_SPACE):
            cpu.kv_cache_budget(0.9)


def test_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    core = "processor\t: {p}\nphysical id\t: {s}\ncore id\t\t: {c}\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16 amx_tile\n"
    # 2 sockets x 2 cores x 2 hyperthreads
    blocks = [core.format(p=i, s=i // 4, c=(i // 2) % 2) for i in range(8)]
    info.write_text("\n".join(blocks))
    physical, isa = read_cpuinfo(str(info))
    assert physical == 4
    assert isa == ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    assert read_cpuinfo(str(arm)) == (None, ["asimd", "sve", "bf16"])
    assert read_cpuinfo(str(tmp_path / "missing")) == (None, [])


# -- cuda --------------------------------------------------------------------------------------

def test_cuda_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert CudaPlatform().availability().reason == "torch built without CUDA (torch.version.cuda is None)"
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert "use --device rocm" in CudaPlatform().availability().reason
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CudaPlatform().availability().reason == "no CUDA device visible (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("cc, fp8, bf16", [((9, 0), True, True), ((8, 9), True, True), ((8, 0), False, True),
                                           ((7, 5), False, False)])
def test_cuda_capabilities_follow_compute_capability(monkeypatch, cc, fp8, bf16):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: cc)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (3 << 30, 80 << 30))
    cuda = CudaPlatform()
    assert cuda.availability()
    caps = cuda.capabilities
    assert caps.fp8 is fp8 and ("bfloat16" in caps.dtypes) is bf16
    assert caps.graphs and caps.pinned_memory and not caps.static_shapes
    assert (cuda.memory_info().free, cuda.memory_info().total) == (3 << 30, 80 << 30)


def test_cuda_capabilities_without_a_gpu_claim_nothing():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert CudaPlatform().capabilities.fp8 is False


# -- rocm --------------------------------------------------------------------------------------

def test_rocm_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert RocmPlatform().availability().reason == "torch built without ROCm (torch.version.hip is None)"
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RocmPlatform().availability().reason == "no ROCm (HIP) device visible (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("arch, fp8", [("gfx942:sramecc+:xnack-", True), ("gfx950", True), ("gfx90a:sramecc+", False),
                                       ("gfx1100", False)])
def test_rocm_fp8_follows_the_gfx_arch(monkeypatch, arch, fp8):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: types.SimpleNamespace(gcnArchName=arch))
    rocm = RocmPlatform()
    assert rocm.arch() == gfx_arch(arch)
    assert rocm.capabilities.fp8 is fp8


# -- xpu ---------------------------------------------------------------------------------------

def test_xpu_reasons(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert XpuPlatform().availability().reason == "no Intel XPU device visible (torch.xpu.is_available() is False)"
    monkeypatch.delattr(torch, "xpu")
    assert "has no torch.xpu module" in XpuPlatform().availability().reason


@pytest.fixture
def fake_ipex(tmp_path, monkeypatch):
    """An IPEX that is installed (with a version) but explodes if anything imports it."""
    pkg = tmp_path / "intel_extension_for_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('IPEX must not be imported to describe the platform')\n")
    base = torch.__version__.split("+")[0].rsplit(".", 1)[0]
    dist = tmp_path / f"intel_extension_for_pytorch-{base}.10+xpu.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel-extension-for-pytorch\nVersion: {base}.10+xpu\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{base}.10+xpu"


def test_xpu_describe_reports_ipex_without_importing_it(fake_ipex):
    facts = XpuPlatform().describe()
    assert facts["ipex"] == fake_ipex and facts["ipex_matches_torch"] is True and facts["ipex_for_xpu"] is True
    assert "intel_extension_for_pytorch" not in sys.modules
    assert ipex_status("1.0.0")["ipex_matches_torch"] is False


def test_xpu_without_ipex(monkeypatch):
    from tokenmill_xpu import platform as xpu_platform

    monkeypatch.setattr(xpu_platform, "IPEX_MODULE", "intel_extension_for_pytorch_not_here")
    assert ipex_status(torch.__version__) == {"ipex": None, "ipex_matches_torch": None, "ipex_for_xpu": None}


def test_xpu_memory_and_devices_come_from_torch_xpu(monkeypatch):
    """No XPU here: torch.xpu's device and memory calls are faked where the platform reads them."""
    props = types.SimpleNamespace(total_memory=48 << 30)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda index=0: ((40 - index) << 30, 48 << 30))
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda index=0: f"Intel(R) Data Center GPU Max {index}")
    xpu = XpuPlatform()
    assert xpu.availability()
    assert (xpu.memory_info().free, xpu.memory_info().total) == (40 << 30, 48 << 30)
    assert xpu.memory_info(1).free == 39 << 30
    facts = xpu.describe()
    assert facts["device_count"] == 2
    assert facts["devices"][1] == {"name": "Intel(R) Data Center GPU Max 1", "total_memory": 48 << 30}
    assert xpu.capabilities.pinned_memory and xpu.capabilities.graphs == hasattr(torch.xpu, "XPUGraph")


# -- tpu ---------------------------------------------------------------------------------------

FAKE_RUNTIME = """
import os
def device_type():
    return os.environ.get("PJRT_DEVICE")
def global_runtime_device_count():
    return int(os.environ.get("FAKE_TPU_COUNT", "4"))
"""
FAKE_XLA_MODEL = """
import torch
def xla_device(n=None):
    return torch.device("cpu")
def get_memory_info(device=None):
    return {"bytes_used": 1 << 30, "bytes_limit": 16 << 30, "peak_bytes_used": 2 << 30}
"""


@pytest.fixture
def fake_torch_xla(tmp_path, monkeypatch):
    pkg = tmp_path / "torch_xla"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime.py").write_text(FAKE_RUNTIME)
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "xla_model.py").write_text(FAKE_XLA_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [m for m in sys.modules if m == "torch_xla" or m.startswith("torch_xla.")]:
        del sys.modules[name]


def test_tpu_without_torch_xla():
    import importlib.util

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed")
    assert TpuPlatform().availability().reason == "torch_xla is not installed"


def test_tpu_runs_on_xla_cpu_below_the_cpu_platform(fake_torch_xla, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    tpu = TpuPlatform()
    assert tpu.availability() and tpu.priority < CpuPlatform().priority  # --device auto never picks XLA:CPU
    monkeypatch.setenv("PJRT_DEVICE", "CUDA")
    assert TpuPlatform().availability().reason == "torch_xla found but PJRT device is CUDA, not TPU (or CPU)"
    monkeypatch.delenv("PJRT_DEVICE")
    assert "no PJRT device selected" in TpuPlatform().availability().reason


def test_tpu_available_with_a_tpu_pjrt_device(fake_torch_xla, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    tpu = TpuPlatform()
    assert tpu.availability()
    mem = tpu.memory_info()
    assert (mem.free, mem.total) == (15 << 30, 16 << 30)
    assert tpu.priority == 80
    monkeypatch.setenv("FAKE_TPU_COUNT", "0")
    assert tpu.availability().reason == "torch_xla found but no TPU device visible"


def test_engine_on_cpu_sizes_its_kv_pool_from_the_env(monkeypatch):
    from tokenmill import LLM
    from tokenmill.testing.tiny_models import make_tiny_model
    from tokenmill_cpu import platform as cpu_platform

    monkeypatch.setenv(cpu_platform.ENV_KV_SPACE, "0.01")
    engine = LLM(model=str(make_tiny_model("llama")), dtype="float32", device="cpu").engine
    assert engine.kv.num_blocks == int(0.01 * (1 << 30)) // engine.runner.block_bytes()


# -- the shared accelerator base ----------------------------------------------------------------

VENDOR_ONLY = {"name", "ray_resource", "torch_device_type", "priority", "dist_backend", "label", "graph_class", "build_problem",
               "probe_capabilities", "device_facts", "runtime_facts", "arch", "__doc__", "__module__",
               "__qualname__", "__firstlineno__", "__static_attributes__"}


@pytest.mark.parametrize("cls", [CudaPlatform, RocmPlatform, XpuPlatform])
def test_gpu_platforms_hold_only_vendor_specifics(cls):
    from tokenmill.accelerator import AcceleratorPlatform

    assert issubclass(cls, AcceleratorPlatform)
    extra = set(vars(cls)) - VENDOR_ONLY
    assert not extra, f"{cls.__name__} re-implements {sorted(extra)}: that belongs in tokenmill.accelerator"


class _FakeGraph:
    captured = 0

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _FakeDeviceModule:
    """A device module as torch.get_device_module returns one, for a machine without the device."""

    def __init__(self, with_mem_get_info=True):
        self.log = []
        if with_mem_get_info:
            self.mem_get_info = lambda index=0: (5 << 30, 24 << 30)

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def get_device_properties(self, index=0):
        return types.SimpleNamespace(name=f"fake{index}", total_memory=24 << 30)

    def memory_reserved(self, index=0):
        return 4 << 30

    def empty_cache(self):
        self.log.append("empty_cache")

    def synchronize(self):
        self.log.append("synchronize")

    class Stream:
        def wait_stream(self, other):
            pass

    def current_stream(self):
        return self.Stream()

    def stream(self, s):
        import contextlib

        self.log.append("side stream")
        return contextlib.nullcontext()

    FakeGraph = _FakeGraph

    def graph(self, g, pool=None):
        import contextlib

        log = self.log

        @contextlib.contextmanager
        def capture():
            log.append(("capture", pool))
            yield
            log.append("captured")
        return capture()

    def graph_pool_handle(self):
        return "pool"


def _fake_accelerator(module, graphs=True):
    from tokenmill.accelerator import AcceleratorPlatform

    class Fake(AcceleratorPlatform):
        name = "fakegpu"
        torch_device_type = "cuda"
        label = "Fake"
        graph_class = "FakeGraph" if graphs else None

        def device_module(self):
            return module

    return Fake()


def test_accelerator_base_memory_allocator_and_describe_through_the_device_module():
    mod = _FakeDeviceModule()
    p = _fake_accelerator(mod)
    assert p.availability()
    assert (p.memory_info().free, p.memory_info().total) == (5 << 30, 24 << 30)
    p.free(torch.zeros(1))
    assert mod.log == ["empty_cache"]
    facts = p.describe()
    assert facts["device_count"] == 2 and [d["name"] for d in facts["devices"]] == ["fake0", "fake1"]
    caps = p.capabilities
    assert caps.graphs and caps.pinned_memory and not caps.static_shapes
    # a backend without a driver memory query: free is what the caching allocator has not reserved
    bare = _fake_accelerator(_FakeDeviceModule(with_mem_get_info=False))
    assert (bare.memory_info().free, bare.memory_info().total) == (20 << 30, 24 << 30)


def test_accelerator_base_captures_a_graph_after_warming_up_on_a_side_stream():
    mod = _FakeDeviceModule()
    p = _fake_accelerator(mod)
    calls = []
    out = torch.zeros(3)

    def fn():
        calls.append(len(mod.log))
        return out

    graph = p.capture_graph(fn, pool=p.graph_pool())
    assert len(calls) == 3  # two warm-up calls, one captured
    assert mod.log == ["side stream", ("capture", "pool"), "captured"]
    assert graph.replay() is out and graph.graph.replays == 1
    with pytest.raises(NotImplementedError, match="does not capture graphs"):
        _fake_accelerator(mod, graphs=False).capture_graph(fn)


def test_accelerator_base_reports_a_missing_device_module(monkeypatch):
    from tokenmill.accelerator import AcceleratorPlatform

    class Nope(AcceleratorPlatform):
        name, torch_device_type, label = "nope", "nosuchdevice", "Nope"

    assert Nope().availability().reason == f"torch {torch.__version__} has no torch.nosuchdevice module"
    assert Nope().capabilities.graphs is False and Nope().describe()["torch"] == torch.__version__
