"""The shared Triton dequantize-matmuls (GPTQ/AWQ packed, int8/W8A8/FP8 scaled) under Triton's interpreter.

The conformance suite checks the registered classes on its grid (tests/test_conformance_triton.py);
these are the cases it does not reach: act-order groups of unequal size (the kernel's ``gidx``
path), experts with per-expert act-order, several M tiles and a K tail, the reference fallback
of a layer a tensor descriptor cannot address, AWQ with three fused shards, and FP8, which
the suite skips under the interpreter because no platform declares FP8 there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.conformance.tolerances import quant_tolerance

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = Path(__file__).with_name("triton_quant_cases.py")
NAMES = ["gptq4 uneven act-order groups", "gptq4 act-order experts", "gptq4 many M tiles, K tail",
         "gptq8 unaligned rows (reference fallback)", "awq g64 fused", "int8 K tail", "w8a8 K tail",
         "fp8 checkpoint fused", "fp8 online experts"]


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", NAMES)
def test_triton_method_matches_the_reference(results, name, dtype):
    got = results[f"{name}/torch.{dtype}"]
    assert "error" not in got, got
    fmt = name.split()[0].rstrip("48")
    assert got["err"] <= quant_tolerance("fp8" if fmt == "fp" else fmt, dtype), got
    assert got["kernel"] == ("fallback" not in name), got
    assert got["gidx"] == ("uneven" in name), got


def test_fp8_kernel_only_where_the_platform_declares_fp8(results):
    where_fp8, elsewhere = results["fp8 available"]
    assert where_fp8 is None
    assert "capabilities.fp8" in elsewhere


def test_gpu_plugins_register_the_triton_methods_above_the_reference():
    from tokenmill.platform import Capabilities
    from tokenmill.plugins import PluginManager
    from tokenmill.quant.registry import resolve_quantization

    pm = PluginManager(allowlist=["cuda", "rocm", "xpu"]).load()
    methods = pm.registered("quantization_methods")
    for name in ("cuda", "rocm", "xpu"):
        ours = [c for _, c in methods if c.device_types == (name,)]
        assert sorted(c.__name__ for c in ours) == sorted(
            f"Triton{f}Method_{name}" for f in ("GPTQ", "AWQ", "Int8", "Fp8")), ours

        class Plat:
            capabilities = Capabilities(dtypes=("float32",), fp8=False, graphs=False, static_shapes=False)
        Plat.name = name
        cfg = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        assert type(resolve_quantization(methods, Plat, None, cfg)).__name__ == f"TritonGPTQMethod_{name}"
        assert type(resolve_quantization(methods, Plat, None, None, "w8a8")).__name__ == f"TritonInt8Method_{name}"
        # Without FP8 the Triton class steps aside and the core's reference dequantizes.
        assert type(resolve_quantization(methods, Plat, None, None, "fp8")).__name__ == "Fp8Method"
