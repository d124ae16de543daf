"""The offline CLI commands as users run them: generate and the benchmarks, on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenmill.testing.tiny_models import make_tiny_model


def tokenmill(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def model():
    return str(make_tiny_model("llama", max_position_embeddings=1024))


def test_generate_json(model):
    out = json.loads(tokenmill("generate", model, "--prompt", "def main(", "--prompt", "import os",
                               "--max-tokens", "6", "--json").stdout)
    from tokenmill import LLM, SamplingParams

    want = LLM(model=model).generate(["def main(", "import os"], SamplingParams(max_tokens=6, temperature=0))
    assert [o["outputs"][0]["token_ids"] for o in out] == [w.outputs[0].token_ids for w in want]


def test_generate_rejects_a_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "generate", str(tmp_path / "nope"), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a local directory" in proc.stderr


def test_bench_throughput_side_by_side(model, tmp_path):
    out = tmp_path / "tp.json"
    proc = tokenmill("bench", "throughput", model, "--num-prompts", "3", "--min-len", "8", "--max-len", "24",
                     "--output-len", "4", "--compare", "hf", "--compare", "reference", "--json-out", str(out))
    results = json.loads(out.read_text())
    assert [r["engine"] for r in results] == ["tokenmill", "hf-generate", "tm-reference"]
    assert all(r["output_tokens"] == 12 for r in results)
    assert len({tuple(r["first_tokens"]) for r in results}) == 1  # same greedy tokens everywhere
    assert "outside the model forward" in proc.stdout


def test_bench_throughput_quantization_modes_side_by_side(model, tmp_path):
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    proc = tokenmill("bench", "throughput", model, "--num-prompts", "2", "--min-len", "8", "--max-len", "16",
                     "--output-len", "4", "--quantization", "fp32,int8,gptq,gptq-bf16", "--quant-group-size", "32",
                     "--json-out", str(out), "--plot", str(png), timeout=600)
    results = {r["mode"]: r for r in json.loads(out.read_text())}
    assert list(results) == ["fp32", "int8", "gptq", "gptq-bf16"] and png.stat().st_size > 0
    assert results["gptq"]["implementation"] == "GPTQMethod (tokenmill)"
    assert results["gptq-bf16"]["implementation"] == "CpuGPTQMethod (cpu)"
    assert results["fp32"]["agreement"] == 1.0 and results["fp32"]["quantization"] == "none"
    assert results["gptq"]["quantization"].startswith("gptq 4-bit group 32")
    fp32, int8, gptq = (results[m]["linear_bytes"] for m in ("fp32", "int8", "gptq"))
    # fp32 on the cpu plugin keeps a tiled copy for its C kernel and the weight (oneDNN-packed where
    # oneDNN packs); without the C kernels, the weight alone
    from tokenmill_cpu import native

    copies = 2 if native.load() is not None else 1
    fp32_one_copy = fp32 / copies
    assert 0.25 < int8 / fp32_one_copy < 0.27  # one byte per weight plus a float32 scale per row
    assert gptq / fp32_one_copy < 0.17  # half a byte, fp16 scales and packed zeros per 32 inputs, int32 g_idx per input
    assert "| gptq |" in proc.stdout and "agreement with fp32" in proc.stdout


def test_bench_prefix(model, tmp_path):
    out = tmp_path / "prefix.json"
    tokenmill("bench", "prefix", model, "--system-len", "64", "--num-questions", "4", "--conversations", "2",
              "--turns", "2", "--trunks", "1", "--branches", "3", "--output-len", "3", "--json-out", str(out))
    summary = json.loads(out.read_text())
    assert [s["workload"] for s in summary] == ["system-prompt", "multi-turn", "branching"]
    for s in summary:
        assert s["same_outputs"]
        assert s["on"]["computed_prompt_tokens"] < s["off"]["computed_prompt_tokens"] == s["off"]["prompt_tokens"]


FAKE_VLLM = '''
"""Stand-in for vLLM's offline API (LLM, SamplingParams, TokensPrompt) over tokenmill, so the
side-by-side harness runs here without vLLM; the real one is driven the same way."""
import tokenmill


class SamplingParams(tokenmill.SamplingParams):
    pass


class LLM:
    def __init__(self, model, dtype, max_model_len, max_num_seqs):
        self.llm = tokenmill.LLM(model=model, dtype=dtype, max_num_seqs=max_num_seqs)  # context: the model's

    def generate(self, prompts, params, use_tqdm=False):
        return self.llm.generate(prompts, params)
'''


def test_bench_throughput_against_vllm_sweep(model, tmp_path):
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    out, png = tmp_path / "tp.json", tmp_path / "tp.png"
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "throughput", model, "--min-len", "8",
                           "--max-len", "24", "--output-len", "4", "--against-vllm", sys.executable,
                           "--sweep-prompts", "2,3", "--plot", str(png), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["engine"], r["prompts"]) for r in results] == [("tokenmill", 2), ("vllm", 2), ("tokenmill", 3),
                                                              ("vllm", 3)]
    assert [r["output_tokens"] for r in results] == [8, 8, 12, 12]
    assert results[0]["outputs_sha"] == results[1]["outputs_sha"]
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and results[1]["threads_bind"]
    assert "all outputs identical" in proc.stdout and png.stat().st_size > 0
