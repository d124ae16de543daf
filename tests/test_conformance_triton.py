"""The shared Triton kernels, through the suite, for each GPU plugin, under Triton's interpreter.

Each run is a fresh process: Triton decides when it is imported whether to interpret.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CLI = [sys.executable, "-m", "tokenmill"]


@pytest.mark.parametrize("plugin", ["cuda", "rocm", "xpu"])
def test_gpu_plugin_triton_kernels_pass_under_the_interpreter(plugin, tmp_path):
    report = tmp_path / f"{plugin}.md"
    proc = subprocess.run(CLI + ["conformance", plugin, "--interpret", "-q", "--report", str(report)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = report.read_text()
    assert " 0 failed" in text
    # The kernels and the attention really ran (on CPU tensors), the device-only checks were skipped with why.
    for check in (f"kernel/{plugin}/rms_norm/float16", f"kernel/{plugin}/rotary_embedding/float32",
                  f"attention/{plugin}/triton-{plugin}/float16/mixed-", f"e2e/{plugin}/mistral",
                  f"quant/{plugin}/TritonGPTQMethod_{plugin}/gptq/float16",
                  f"quant/{plugin}/TritonAWQMethod_{plugin}/awq/float32",
                  f"quant/{plugin}/TritonInt8Method_{plugin}/w8a8/float16"):
        line = next(ln for ln in text.splitlines() if f"`{check}" in ln)
        assert "| pass |" in line, line
    device_line = next(ln for ln in text.splitlines() if f"`platform/{plugin}/device`" in ln)
    assert "| skip |" in device_line and "not available here" in device_line


def test_interpreter_mode_refuses_a_triton_imported_too_early():
    code = ("import triton, os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from tokenmill.conformance.target import enable_interpreter\n"
            "print(enable_interpreter())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "imported before interpreter mode" in proc.stdout, proc.stdout + proc.stderr


def test_triton_kernels_on_cpu_tensors_without_the_interpreter_explain_themselves():
    code = ("import torch\n"
            "from tokenmill.kernels.triton.activation import silu_and_mul\n"
            "try:\n    silu_and_mul(torch.randn(2, 8))\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "TRITON_INTERPRET=1" in proc.stdout, proc.stdout + proc.stderr


# 18 kernels: 6 reference ops (apply_token_bitmask included) + 4 Triton ops on each of cuda, rocm, xpu;
# 4 Triton quantization classes on each of them.
def test_registration_does_not_import_triton():
    code = ("import sys\nfrom tokenmill.plugins import PluginManager\n"
            "pm = PluginManager(allowlist=['cuda', 'rocm', 'xpu']).load()\n"
            "q = [c for _, c in pm.registered('quantization_methods') if 'Triton' in c.__name__]\n"
            "print(len(pm.kernel_impls()), len(pm.attention_backends()), len(q), 'triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["18", "4", "12", "False"], proc.stdout + proc.stderr
