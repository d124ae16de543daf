"""The cpu plugin's IPEX path without IPEX: which case holds, what registers, and the glue against a fake.

The fake (:mod:`fake_ipex`) does what IPEX 2.8 does, in plain torch, and refuses what
crashes IPEX; the real IPEX runs in ``.ci/ipex.sh``.
"""
from __future__ import annotations

import sys

import pytest
import torch

from fake_ipex import install_fake_ipex, make_fake_ipex
from tokenmill.conformance import PASS, run_suite
from tokenmill.conformance.attention_checks import copy_blocks_check, grid, run_case, skip_slot_check
from tokenmill.conformance.kernel_checks import run_kernel
from tokenmill_cpu import ipex as cpu_ipex
from tokenmill_cpu import plugin as cpu_plugin
from tokenmill_cpu.ipex_attention import ipex_attention_backend

MATCHING = torch.__version__.split("+")[0].rsplit(".", 1)[0] + ".0"


@pytest.fixture
def fresh_ipex(monkeypatch):
    """Forget any earlier import attempt, and drop the fake package from sys.modules afterwards."""
    monkeypatch.setattr(cpu_ipex, "_loaded", {})
    monkeypatch.delenv(cpu_ipex.ENV_IPEX, raising=False)
    yield
    sys.modules.pop("intel_extension_for_pytorch", None)


def _registered():
    return ([b.name for b in cpu_plugin.tokenmill_attention_backends()],
            sorted(k.provider for k in cpu_plugin.tokenmill_kernels() if k.provider.endswith("+ipex")))


def test_without_ipex_the_plugin_registers_only_its_own(fresh_ipex, monkeypatch):
    monkeypatch.setattr(cpu_ipex, "MODULE", "intel_extension_for_pytorch_not_here")
    assert cpu_ipex.ipex_status() == (False, "intel-extension-for-pytorch is not installed; skipped (torch paths serve)")
    assert _registered() == (["cpu"], [])
    assert "not installed" in cpu_plugin.conformance_facts()["intel-extension-for-pytorch"]
    assert cpu_plugin.conformance_summary() == {"IPEX ops called during the checks": "none (IPEX not used)"}


def test_an_ipex_for_another_torch_is_skipped_unimported(fresh_ipex, tmp_path, monkeypatch):
    install_fake_ipex(tmp_path, monkeypatch, "1.0.0", init="raise ImportError('must not be imported')\n")
    usable, reason = cpu_ipex.ipex_status()
    assert not usable and "intel-extension-for-pytorch 1.0.0 does not match torch" in reason
    assert _registered() == (["cpu"], [])
    assert "intel_extension_for_pytorch" not in sys.modules


def test_an_ipex_that_fails_to_import_is_skipped_with_the_error(fresh_ipex, tmp_path, monkeypatch):
    # IPEX 2.8 next to transformers 5 fails this way: its import names a class transformers dropped.
    install_fake_ipex(tmp_path, monkeypatch, MATCHING, init="raise NameError(\"name 'MoeModelOutputWithPast' is not defined\")\n")
    usable, reason = cpu_ipex.ipex_status()
    assert not usable
    assert reason == (f"intel-extension-for-pytorch {MATCHING} failed to import (NameError: name "
                      f"'MoeModelOutputWithPast' is not defined); skipped")
    assert _registered() == (["cpu"], [])


def test_a_usable_ipex_registers_attention_and_rms_norm_unless_disabled(fresh_ipex, tmp_path, monkeypatch):
    install_fake_ipex(tmp_path, monkeypatch, MATCHING)
    assert cpu_ipex.ipex_status() == (True, f"intel-extension-for-pytorch {MATCHING}")
    assert _registered() == (["cpu", "cpu-ipex"], ["tokenmill-cpu+ipex"] * 2)
    ipex_kernels = [k for k in cpu_plugin.tokenmill_kernels() if k.provider.endswith("+ipex")]
    assert sorted(k.op for k in ipex_kernels) == ["fused_add_rms_norm", "rms_norm"]
    assert all(k.priority > 10 for k in ipex_kernels)  # above the plugin's own ops
    monkeypatch.setenv(cpu_ipex.ENV_IPEX, "0")
    assert cpu_ipex.ipex_status()[1].startswith(f"{cpu_ipex.ENV_IPEX}=0")
    assert _registered() == (["cpu"], [])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_ipex_rms_norm_glue_matches_the_reference(dtype):
    fake = make_fake_ipex()
    for impl in cpu_ipex.ipex_kernels("tokenmill-cpu", fake):
        assert "match the reference" in run_kernel(impl, dtype, "cpu")
    assert set(fake.calls) == {"rms_norm", "add_rms_norm"}


def test_ipex_attention_glue_matches_the_reference_on_the_whole_grid():
    """The IPEX-layout backend over the fake ops: every scenario, GQA ratio, block size, window, -1 slots."""
    fake = make_fake_ipex()
    backend = ipex_attention_backend(fake)
    assert backend.kv_cache_shape(7, 16, 2, 64) == (2, 7, 2, 16, 64)
    cases = grid(["float32"], "standard", sliding_window=True)
    for case in cases:
        run_case(backend, case, "cpu")
    assert skip_slot_check(backend, "cpu", "float32") == "slot -1 writes nothing"
    assert copy_blocks_check(backend, "cpu", "float32") == "copied pages attend like the originals"
    assert {"reshape_and_cache", "single_query_cached_kv_attention", "flash_attn_varlen_func"} <= set(fake.calls)


def test_conformance_on_a_fake_ipex_runs_every_ipex_check_and_reports_the_calls(fresh_ipex, tmp_path, monkeypatch):
    install_fake_ipex(tmp_path, monkeypatch, MATCHING)
    before = dict(cpu_ipex.CALLS)
    report = run_suite("cpu", patterns=["cpu-ipex/float32/decode", "cpu-ipex/float32/mixed", "+ipex/float32",
                                        "kernel/cpu/rms_norm/tokenmill-cpu/float32", "e2e/cpu/engine-llama"])
    results = {r.check.id: r for r in report.results}
    assert report.ok, report.table()
    assert all(r.status == PASS for r in report.results)
    assert "kernel/cpu/rms_norm/tokenmill-cpu+ipex/float32" in results
    assert "kernel/cpu/rms_norm/tokenmill-cpu/float32" in results  # the plugin's own, beside it
    engine = results["e2e/cpu/engine-llama"].detail
    assert "attention cpu-ipex" in engine and "'rms_norm': 'tokenmill-cpu+ipex'" in engine
    called = report.facts["IPEX ops called during the checks"]
    for op in ("rms_norm", "add_rms_norm", "reshape_and_cache", "single_query_cached_kv_attention",
               "flash_attn_varlen_func"):
        assert cpu_ipex.CALLS[op] > before.get(op, 0), op
        assert op in called
