"""The xpu plugin's IPEX path without an XPU or IPEX: which case holds, what registers, the glue on a fake.

The fake IPEX (:mod:`fake_ipex`, ``layout="xpu"``) follows IPEX for XPU's flash paged
attention: the core's default cache layout, ``reshape_and_cache_flash`` and
``flash_attn_varlen_func``. It runs on CPU tensors, so the glue's planning (dropped ``-1``
slots, padded block tables, cumulative lengths, windows) is checked against the reference
attention here; the real kernels only where an XPU is.
"""
from __future__ import annotations

import sys

import pytest
import torch

from fake_ipex import install_fake_ipex, make_fake_ipex
from tokenmill.conformance.attention_checks import copy_blocks_check, grid, run_case, skip_slot_check
from tokenmill.conformance.kernel_checks import run_kernel
from tokenmill_xpu import ipex_ops
from tokenmill_xpu import plugin as xpu_plugin

BASE = torch.__version__.split("+")[0].rsplit(".", 1)[0]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(ipex_ops, "_loaded", {})
    yield
    sys.modules.pop("intel_extension_for_pytorch", None)


def _ipex_registrations():
    return ([b.name for b in xpu_plugin.tokenmill_attention_backends() if b.name == "xpu-ipex"],
            sorted(k.op for k in xpu_plugin.tokenmill_kernels() if k.provider == "tokenmill-xpu+ipex"))


def test_without_ipex_nothing_of_ipex_registers(fresh, monkeypatch):
    from tokenmill_xpu import platform as xpu_platform

    monkeypatch.setattr(xpu_platform, "IPEX_MODULE", "intel_extension_for_pytorch_not_here")
    assert ipex_ops.xpu_ipex_status()[1].startswith("intel-extension-for-pytorch is not installed")
    assert _ipex_registrations() == ([], [])


@pytest.mark.parametrize("version, init, why", [
    (f"{BASE}.0", "raise ImportError('the CPU build must not be imported by the xpu plugin')\n", "is not the XPU build"),
    ("1.0.10+xpu", "raise ImportError('must not be imported')\n", "does not match torch"),
    (f"{BASE}.10+xpu", "raise OSError('libsycl.so.8: cannot open shared object file')\n", "failed to import (OSError"),
])
def test_unusable_ipex_builds_are_skipped_with_the_reason(fresh, tmp_path, monkeypatch, version, init, why):
    install_fake_ipex(tmp_path, monkeypatch, version, init=init)
    usable, reason = ipex_ops.xpu_ipex_status()
    assert not usable and why in reason
    assert _ipex_registrations() == ([], [])


def test_a_usable_ipex_for_xpu_registers_attention_and_rms_norm(fresh, tmp_path, monkeypatch):
    install_fake_ipex(tmp_path, monkeypatch, f"{BASE}.10+xpu", layout="xpu")
    assert ipex_ops.xpu_ipex_status() == (True, f"intel-extension-for-pytorch {BASE}.10+xpu")
    assert _ipex_registrations() == (["xpu-ipex"], ["fused_add_rms_norm", "rms_norm"])
    facts = xpu_plugin.conformance_facts()
    assert facts["intel-extension-for-pytorch (XPU)"] == f"intel-extension-for-pytorch {BASE}.10+xpu"
    if not torch.xpu.is_available():
        assert facts["Intel XPU"].startswith("none here (no Intel XPU device visible")
        assert "checked against fakes" in facts["Intel XPU"]


def test_ipex_xpu_attention_glue_matches_the_reference_on_the_whole_grid():
    fake = make_fake_ipex(layout="xpu")
    backend = ipex_ops.xpu_ipex_attention_backend(fake)
    assert backend.kv_cache_shape(7, 16, 2, 64) == (2, 7, 16, 2, 64)  # the default layout, as IPEX for XPU reads
    for case in grid(["float32"], "standard", sliding_window=True):
        run_case(backend, case, "cpu")
    assert skip_slot_check(backend, "cpu", "float32") == "slot -1 writes nothing"
    assert copy_blocks_check(backend, "cpu", "float32") == "copied pages attend like the originals"
    assert set(fake.calls) == {"reshape_and_cache_flash", "flash_attn_varlen_func"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ipex_xpu_rms_norm_glue_matches_the_reference(dtype):
    fake = make_fake_ipex(layout="xpu")
    impls = ipex_ops.xpu_ipex_kernels("tokenmill-xpu", fake)
    assert [(k.op, k.device_type) for k in impls] == [("rms_norm", "xpu"), ("fused_add_rms_norm", "xpu")]
    for impl in impls:
        assert "match the reference" in run_kernel(impl, dtype, "cpu")
    assert set(fake.calls) == {"rms_norm", "add_rms_norm"}
