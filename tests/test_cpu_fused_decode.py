"""The cpu plugin's one-call decode step against its per-op forward: identical tokens and logprobs."""
from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import make_tiny_model
from tokenmill_cpu import native, native_tiles
from tokenmill_cpu.fused_decode import ENV_DISABLE, install

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler for the cpu plugin's kernels")

# Long enough to slide past mistral's (24) and qwen2's (20) windows; the batch mixes lengths.
PROMPTS = ["def fibonacci(n):\n    return", "x", "import os\nimport sys\n\n" * 4, "The quick brown fox"]


def _run(path, dtype, monkeypatch, fused: bool, prompts=PROMPTS, max_tokens=24, **engine):
    monkeypatch.setenv(ENV_DISABLE, "1" if fused else "0")
    llm = LLM(model=path, dtype=dtype, **engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, params)
    got = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
           for o in outs]
    return got, getattr(llm.engine.runner.model, "fused_decode", None), llm.stats()


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("mistral", "float32"), ("qwen2", "float32"),
                                        ("qwen3", "float32"), ("llama", "bfloat16"), ("qwen3", "bfloat16")])
def test_fused_decode_equals_per_op(arch, dtype, monkeypatch):
    path = str(make_tiny_model(arch))
    fused, runner, _ = _run(path, dtype, monkeypatch, fused=True)
    per_op, none, _ = _run(path, dtype, monkeypatch, fused=False)
    assert runner is not None and runner.steps > 0, "the decode steps did not take the one-call path"
    assert none is None
    assert fused == per_op  # the same kernels in the same order: bit-identical logprobs


def test_fused_decode_with_prefix_caching_and_preemption(monkeypatch):
    path = str(make_tiny_model("llama"))
    engine = dict(num_blocks=8, block_size=16, enable_prefix_caching=True)
    prompts = PROMPTS + [PROMPTS[0] + " fib(n - 1)"]
    fused, runner, stats = _run(path, "float32", monkeypatch, True, prompts, max_tokens=40, **engine)
    assert stats.num_preemptions > 0, "the small pool was meant to force preemption"
    per_op, _, _ = _run(path, "float32", monkeypatch, False, prompts, max_tokens=40, **engine)
    assert runner.steps > 0 and fused == per_op


def test_steps_past_the_row_kernel_run_per_op(monkeypatch):
    """float32 decode batches above the tiled kernel's limit go to oneDNN, i.e. the per-op forward."""
    path = str(make_tiny_model("llama"))
    prompts = [f"item {i}:" for i in range(native_tiles.MAX_ROWS + 8)]
    fused, runner, _ = _run(path, "float32", monkeypatch, True, prompts, max_tokens=3)
    assert runner.row_limit == native_tiles.MAX_ROWS
    assert runner.steps == 0
    assert fused == _run(path, "float32", monkeypatch, False, prompts, max_tokens=3)[0]


def test_install_says_why_not(monkeypatch):
    llm = LLM(model=str(make_tiny_model("mixtral")), dtype="float32")
    model = llm.engine.runner.model
    assert "not the plain Llama layer" in install(model)
    assert getattr(model, "fused_decode", None) is None
    monkeypatch.setenv(ENV_DISABLE, "0")
    assert install(model) == f"disabled by {ENV_DISABLE}=0"


@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_quantized_linears_keep_the_per_op_forward(quantization):
    """A quantized linear holds no float ``weight``: install names the method instead of crashing."""
    llm = LLM(model=str(make_tiny_model("llama")), dtype="float32", quantization=quantization)
    model = llm.engine.runner.model
    assert "not the plugin's unquantized" in install(model)
    assert getattr(model, "fused_decode", None) is None
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_small_prefill_chunks_run_as_decode_rows(arch, monkeypatch):
    """Chunks of at most SMALL_PREFILL tokens (a fresh prompt's, a continued one's, beside decodes) are
    decode rows of the one-call step; tokens and logprobs agree with the reference ops' SDPA prefill.
    mistral: its sliding window (24) is shorter than the prompts."""
    from tokenmill_cpu.attention import SMALL_PREFILL

    monkeypatch.setenv(ENV_DISABLE, "1")
    path = str(make_tiny_model(arch))
    prompts = [PROMPTS[2], PROMPTS[0], "x"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    engine = dict(enable_chunked_prefill=True, max_num_batched_tokens=SMALL_PREFILL)
    ours = LLM(model=path, dtype="float32", **engine)
    got = ours.generate(prompts, params)
    runner = ours.engine.runner.model.fused_decode
    assert runner.steps == ours.stats().steps, "every step, prefill chunks included, was meant to be one call"
    want = LLM(model=path, dtype="float32", reference_ops=True, **engine).generate(prompts, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            tok = next(iter(b))
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
