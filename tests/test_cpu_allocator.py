"""The cpu plugin's allocator settings: freed activation memory is reused, not faulted in again."""
import os
import subprocess
import sys

import pytest

from tokenmill_cpu.allocator import _left_alone

# One prefill step's activations, as a Llama block makes them (1,700 tokens, hidden 512): page
# faults per step, after a first step has warmed everything up.
PROBE = r"""
import resource, sys, torch
import torch.nn.functional as F
from tokenmill_cpu.allocator import configure_allocator
if sys.argv[1] == "on":
    print(configure_allocator(), file=sys.stderr)
torch.set_num_threads(2)
w = [torch.randn(n, k) for k, n in ((512, 1024), (512, 512), (512, 2048), (1024, 512))]
def step(x):
    for _ in range(4):
        q, k, v = F.linear(x, w[0]).split([512, 256, 256], dim=1)
        h = x + F.linear((q * 1.01).contiguous(), w[1])
        g = F.linear(h, w[2])
        x = h + F.linear(F.silu(g[:, :1024]) * g[:, 1024:], w[3])
    return x
x = torch.randn(1700, 512)
step(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults(mode: str, **env) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True, timeout=60)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activation_memory_is_reused_without_page_faults():
    off, on = _faults("off"), _faults("on")
    assert off > 3000, off  # glibc maps fresh pages for the large activations of every step
    assert on * 4 < off, (on, off)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_allocator_choice_is_left_alone():
    # With the user's own glibc tunable the settings are not applied: fresh pages every step.
    assert _faults("on", MALLOC_ARENA_MAX="4") > 3000


def test_what_counts_as_the_users_choice():
    assert _left_alone({}) is None
    assert _left_alone({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc is preloaded"
    assert _left_alone({"LD_PRELOAD": "/opt/libjemalloc.so"}) == "jemalloc is preloaded"
    assert _left_alone({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    assert _left_alone({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}) == "GLIBC_TUNABLES sets glibc.malloc"
    assert _left_alone({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None
