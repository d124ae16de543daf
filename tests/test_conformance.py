"""The conformance suite itself: it passes the CPU plugin, fails a wrong plugin, reports both ways."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.attention.interface import AttentionBackend, AttentionSpec
from tokenmill.cli import main
from tokenmill.conformance import FAIL, PASS, SKIP, PluginNotFound, run_suite
from tokenmill.conformance.attention_checks import GQA_RATIOS, SCENARIOS, grid, refusal_check, refusal_specs

ROOT = Path(__file__).resolve().parent.parent
OFFBYONE = str(ROOT / "tests" / "conformance_fixtures" / "offbyone_plugin.py")


@pytest.fixture(scope="module")
def cpu_report():
    return run_suite("cpu")


@pytest.fixture(scope="module")
def offbyone_report():
    return run_suite(OFFBYONE)


def _by_id(report):
    return {r.check.id: r for r in report.results}


def test_cpu_plugin_passes_the_whole_suite(cpu_report):
    assert cpu_report.ok, cpu_report.table()
    results = _by_id(cpu_report)
    attention = [r for cid, r in results.items() if cid.startswith("attention/cpu/cpu/")]
    # every declared dtype, every scenario and GQA ratio, sliding window; nothing skipped
    for dtype in ("float32", "float16", "bfloat16"):
        for scenario in SCENARIOS:
            assert any(f"/{dtype}/{scenario}-" in r.check.id for r in attention), (dtype, scenario)
        assert any(f"/{dtype}/" in r.check.id and "window" in r.check.id for r in attention)
    assert all(r.status == PASS for r in attention)
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "apply_token_bitmask"):
        assert results[f"kernel/cpu/{op}/float32"].status == PASS
    for check in ("e2e/cpu/llama", "e2e/cpu/qwen3", "e2e/cpu/mistral", "e2e/cpu/engine-llama",
                  "platform/cpu/kv_pool", "platform/cpu/memory_info", "refusal/cpu/cpu/num_heads-not-a-multiple-of-num_kv_heads"):
        assert results[check].status == PASS, results[check].detail
    assert "attention cpu" in results["e2e/cpu/llama"].detail
    # every quantized matmul the cpu plugin registers, in every dtype, with its measured error
    for mode, dtypes in (("int8", ("bfloat16",)), ("w8a8", ("float32", "float16", "bfloat16"))):
        for dtype in dtypes:
            r = results[f"quant/cpu/CpuInt8Method/{mode}/{dtype}"]
            assert r.status == PASS and "worst relative error" in r.detail, r.detail
    for dtype in ("float32", "float16"):  # weight-only int8 there: the reference is faster, and serves
        r = results[f"quant/cpu/CpuInt8Method/int8/{dtype}"]
        assert r.status == SKIP and "bfloat16 activations only" in r.detail, r.detail
    # the int4 matmul serves bfloat16 (8-bit GPTQ refused); other dtypes are refused, the reference serves them
    gptq = results["quant/cpu/CpuGPTQMethod/gptq/bfloat16"]
    assert gptq.status == PASS and "27 cases" in gptq.detail and "refused 1" in gptq.detail, gptq.detail
    awq = results["quant/cpu/CpuAWQMethod/awq/bfloat16"]
    assert awq.status == PASS and "9 cases" in awq.detail, awq.detail
    for cls, key in (("CpuGPTQMethod", "gptq"), ("CpuAWQMethod", "awq")):
        for dtype in ("float32", "float16"):
            r = results[f"quant/cpu/{cls}/{key}/{dtype}"]
            assert r.status == SKIP and "bfloat16 activations only" in r.detail, r.detail


def test_offbyone_plugin_fails(offbyone_report):
    results = _by_id(offbyone_report)
    assert not offbyone_report.ok
    assert results["setup/load"].status == PASS
    assert results["kernel/offbyone/rms_norm/float32"].status == FAIL
    assert "outside atol" in results["kernel/offbyone/rms_norm/float32"].detail
    prefill = results["attention/offbyone/offbyone/float32/prefill-bs16-gqa1-h64"]
    assert prefill.status == FAIL and "attention output" in prefill.detail
    assert results["attention/offbyone/offbyone/float32/slot-minus-one"].status == FAIL
    assert results["e2e/offbyone/qwen3"].status == FAIL  # head size 64: its backend serves, tokens diverge
    gptq = results["quant/offbyone/OffByOneGPTQ/gptq/float32"]
    assert gptq.status == FAIL and "relative error" in gptq.detail and "exceeds the gptq tolerance" in gptq.detail
    awq = results["quant/offbyone/OffByOneAWQ/awq/float32"]
    assert awq.status == PASS and "9 cases" in awq.detail  # plain, fused and experts, 1, 7 and 40 tokens
    ct = results["quant/offbyone/OffByOneCT/compressed-tensors/float32"]
    assert ct.status == PASS and "54 cases" in ct.detail, ct.detail  # w8a8, fp8, w4a16 x3, w8a16
    # What it declares, it declares honestly: the refusal checks pass.
    refusals = [r for cid, r in results.items() if cid.startswith("refusal/")]
    assert refusals and all(r.status == PASS for r in refusals)
    # Platform checks are unaffected by the bugs.
    assert results["platform/offbyone/kv_pool"].status == PASS


def test_reports_render_failures(offbyone_report, tmp_path):
    table = offbyone_report.table(width=160)
    assert "FAILURES" in table and "kernel/offbyone/rms_norm/float32" in table
    md = offbyone_report.markdown()
    assert md.startswith("# Conformance report")
    assert "| `kernel/offbyone/rms_norm/float32` | **FAIL** |" in md
    assert "## attention" in md and "## refusal" in md
    assert f"{offbyone_report.count(FAIL)} failed" in md


def test_cli_exit_status_and_markdown(tmp_path, capsys):
    report = tmp_path / "report.md"
    assert main(["conformance", OFFBYONE, "-q", "-k", "kernel", "--report", str(report)]) == 1
    assert "**FAIL**" in report.read_text()
    assert main(["conformance", "cpu", "-q", "-k", "kernel/cpu/silu"]) == 0
    out = capsys.readouterr().out
    assert "kernel/cpu/silu_and_mul/float32" in out and "0 failed" in out


def test_unknown_plugin_is_a_clear_error(capsys):
    with pytest.raises(PluginNotFound, match="installed: .*cpu"):
        run_suite("no_such_plugin_xyz")
    assert main(["conformance", "no_such_plugin_xyz"]) == 2
    assert "no plugin 'no_such_plugin_xyz'" in capsys.readouterr().err


def test_pytest_front_end_runs_the_same_checks(tmp_path):
    report = tmp_path / "r.md"
    base = [sys.executable, "-m", "pytest", "--pyargs", "tokenmill.conformance", "-q", "-p", "no:cacheprovider"]
    ok = subprocess.run(base + ["--plugin", "cpu", "-k", "kernel or refusal", "--conformance-report", str(report)],
                        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "passed" in ok.stdout and "capability report" in ok.stdout
    assert "kernel/cpu/rms_norm/float32" in report.read_text()
    bad = subprocess.run(base + ["--plugin", OFFBYONE, "-k", "rms_norm or prefill"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "kernel/offbyone/rms_norm/float32" in bad.stdout and "failed" in bad.stdout


def test_grids_cover_the_dimensions():
    for size in ("small", "standard", "full"):
        cases = grid(["float32"], size, sliding_window=True)
        assert {c.scenario for c in cases} == set(SCENARIOS)
        assert {c.ratio for c in cases} == set(GQA_RATIOS)
        assert {c.block_size for c in cases} == {16, 32}
        assert {c.head_size for c in cases} == {64, 128}
        assert any(c.window for c in cases)
    standard = grid(["float32"], "standard", sliding_window=False)
    assert {(c.scenario, c.ratio) for c in standard} == {(s, r) for s in SCENARIOS for r in GQA_RATIOS}
    assert len(grid(["float32"], "full", sliding_window=False)) == len(SCENARIOS) * 4 * 2 * 2
    assert not any(c.window for c in grid(["float16"], "small", sliding_window=False))


class _Overclaiming(AttentionBackend):
    """Declares head size 64 only, then accepts everything anyway."""

    name = "overclaiming"
    device_types = ("nowhere",)
    head_sizes = (64,)
    dtypes = ("float32",)
    sliding_window = False

    @classmethod
    def supports(cls, spec):
        return None


def test_refusal_checks_catch_a_backend_that_accepts_too_much():
    specs = refusal_specs(_Overclaiming)
    whats = [what for what, _ in specs]
    assert "head size 72" in whats and "dtype float16" in whats and "sliding window" in whats
    for what, spec in specs:
        with pytest.raises(AssertionError, match="outside the declaration"):
            refusal_check(_Overclaiming, what, spec)
    honest = type("Honest", (_Overclaiming,), {"supports": classmethod(AttentionBackend.supports.__func__)})
    for what, spec in refusal_specs(honest):
        assert refusal_check(honest, what, spec).startswith("refused")
    assert honest.supports(AttentionSpec(8, 2, 64, "float32")) is None


def test_cpu_plugin_torch_fallback_passes_too():
    """Without the native decode kernel (no compiler, or disabled) the torch path must conform as well."""
    env = {**__import__("os").environ, "TOKENMILL_CPU_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "conformance", "cpu", "-q", "-k", "attention/cpu/cpu/float32",
                           "-k", "e2e/cpu/llama"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "disabled by TOKENMILL_CPU_NATIVE=0" in proc.stdout and " 0 failed" in proc.stdout
