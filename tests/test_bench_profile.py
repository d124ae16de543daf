"""``tokenmill bench profile``: the per-component breakdown accounts for the whole step."""
import json
import os
import subprocess
import sys

import pytest

from tokenmill.testing.tiny_models import make_tiny_model


PER_OP = ("linear qkv", "linear o", "linear gate_up", "linear down", "lm_head", "attention", "rms_norm", "sampling",
          "outside runner")


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-fused-decode", "per-op"])
def test_profile_components_add_up_to_the_step(tmp_path, fused):
    """The cpu plugin runs decode steps in one call (its ``fused_decode``): timed as one component. The
    prompts are longer than the one-call step's 64 rows, so their prefill runs op by op."""
    model = make_tiny_model("qwen3")  # q/k norms: kernel ops inside attention are timed too
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    env = {**os.environ, "TOKENMILL_CPU_FUSED_DECODE": "1" if fused else "0"}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "profile", str(model), "--device", "cpu",
                           "--batch-sizes", "1,3", "--prompt-len", "70", "--decode-steps", "3",
                           "--max-model-len", "96", "--kv-cache-memory", str(4 << 20),
                           "--plot", str(png), "--json-out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode steps: ms per step" in proc.stdout and "| linear qkv |" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["batch"] for r in results] == [1, 3]
    for r in results:
        dec, pre = r["decode"], r["prefill"]
        assert dec["steps"] == 3 and dec["tokens_per_step"] == r["batch"]
        assert pre["steps"] >= 1 and pre["tokens_per_step"] > r["batch"]
        for phase in (dec, pre):
            # exclusive times: every component plus "outside runner" is the whole step, nothing counted twice
            assert abs(sum(phase["ms"].values()) - phase["step_ms"]) < 1e-6 * max(1.0, phase["step_ms"]) + 1e-6
            one_call = fused and phase is dec
            want = ("fused decode layers", "embedding", "lm_head", "sampling", "outside runner") if one_call else PER_OP
            for comp in want:
                assert phase["ms"].get(comp, 0) > 0, (comp, phase["ms"])
            assert ("linear qkv" in phase["ms"]) != one_call
            assert all(g > 0 for g in phase["gflop_s"].values()) and ("linear qkv" in phase["gflop_s"]) != one_call
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
