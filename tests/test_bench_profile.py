"""``tokenmill bench profile``: the per-component breakdown accounts for the whole step."""
import json
import subprocess
import sys

from tokenmill.testing.tiny_models import make_tiny_model


def test_profile_components_add_up_to_the_step(tmp_path):
    model = make_tiny_model("qwen3")  # q/k norms: kernel ops inside attention are timed too
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "profile", str(model), "--device", "cpu",
                           "--batch-sizes", "1,3", "--prompt-len", "20", "--decode-steps", "3",
                           "--max-model-len", "64", "--kv-cache-memory", str(4 << 20),
                           "--plot", str(png), "--json-out", str(out)], capture_output=True, text=True, timeout=300)
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
            for comp in ("linear qkv", "linear o", "linear gate_up", "linear down", "lm_head", "attention",
                         "rms_norm", "sampling", "outside runner"):
                assert phase["ms"].get(comp, 0) > 0, (comp, phase["ms"])
            assert all(g > 0 for g in phase["gflop_s"].values()) and "linear qkv" in phase["gflop_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
