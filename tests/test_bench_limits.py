"""The matmul limit of `bench throughput`: FLOPs counted from the checkpoint equal the model's own linears."""
from __future__ import annotations

import pytest

from tokenmill import LLM
from tokenmill.bench.limits import ModelShapes, gemm_gflops, workload_limit
from tokenmill.models.layers import Linear
from tokenmill.testing.tiny_models import make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flops_and_kv_bytes_match_the_loaded_model(arch):
    path = make_tiny_model(arch)
    shapes = ModelShapes.from_checkpoint(path)
    llm = LLM(model=str(path), dtype="float32", reference_ops=True)
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    head = [m for m in linears if m.prefix == "lm_head"]
    layer_params = sum(m.in_features * m.out_features for m in linears if m.prefix != "lm_head")
    head_params = sum(m.in_features * m.out_features for m in head) or shapes.lm_head[0] * shapes.lm_head[1]
    assert shapes.flops_per_token(lm_head=False) == 2 * layer_params
    assert shapes.flops_per_token() == 2 * (layer_params + head_params)
    runner = llm.engine.runner
    assert shapes.kv_bytes_per_token(4) == runner.block_bytes() // runner.block_size


def test_workload_limit_counts_prefill_and_decode():
    shapes = ModelShapes(((4, 8),), 2, (4, 16), 1, 4)  # 2 layers of a 4->8 linear: 128 FLOPs; head 128
    assert shapes.flops_per_token(lm_head=False) == 128 and shapes.flops_per_token() == 256
    # 10 prompt tokens (1,280 FLOPs) + 5 output tokens (1,280 FLOPs) at 1 GFLOP/s: 5 tokens in 2.56 us
    assert workload_limit(shapes, 10, 5, 1.0) == pytest.approx(5 / 2.56e-6)
    assert workload_limit(shapes, 0, 0, 1.0) == 0.0


def test_gemm_rate_is_measured_through_the_platforms_float_linear():
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    shapes = ModelShapes(((64, 64),), 1, (64, 128), 1, 8)
    assert gemm_gflops(shapes, rows=16, seconds=0.05) > 0
    assert gemm_gflops(shapes, rows=16, seconds=0.05, method=CpuPackedLinearMethod("none", None, None)) > 0
    assert gemm_gflops(shapes, rows=16, seconds=0.02, windows=3) > 0
    with pytest.raises(ValueError, match="windows"):
        gemm_gflops(shapes, rows=16, windows=0)
