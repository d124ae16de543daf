"""The cpu plugin's allocator settings: freed activation memory is reused, not faulted in again."""
import os
import subprocess
import sys

import pytest

from tokenmill_cpu.allocator import _left_alone

# A step's activations: 48 blocks of 1 MiB taken, written and given back, as a prefill step's ops do
# (touching 12,288 pages). Page faults per step, after two steps have warmed the heap up.
PROBE = r"""
import ctypes, resource, sys
from tokenmill_cpu.allocator import configure_allocator
if sys.argv[1] == "on":
    print(configure_allocator(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def step():
    blocks = [libc.malloc(1 << 20) for _ in range(48)]
    for p in blocks:
        ctypes.memset(p, 1, 1 << 20)
    for p in blocks:
        libc.free(p)
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults(mode: str, **env) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=60)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activation_memory_is_reused_without_page_faults():
    off, on = _faults("off"), _faults("on")
    assert off > 6000, off  # glibc gives the freed heap top back, and the next step faults it in again
    assert on < 100, on


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_allocator_choice_is_left_alone():
    # With the user's own glibc tunable the settings are not applied: fresh pages every step.
    assert _faults("on", MALLOC_ARENA_MAX="4") > 6000


def test_what_counts_as_the_users_choice():
    assert _left_alone({}) is None
    assert _left_alone({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc is preloaded"
    assert _left_alone({"LD_PRELOAD": "/opt/libjemalloc.so"}) == "jemalloc is preloaded"
    assert _left_alone({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    assert _left_alone({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}) == "GLIBC_TUNABLES sets glibc.malloc"
    assert _left_alone({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None
