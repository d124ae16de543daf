"""Shape buckets: padding helpers, and the engine on a static-shape platform compiling a bounded set of graphs.

The static-shape platform here is the CPU with a stand-in compiler: its ``wrap_model``
records the shape signature of every forward (what an XLA-like compiler keys its graph
cache on), and ``compile_count`` is the number of distinct signatures. The real XLA
device is exercised by ``.ci/tpu-xla.sh`` (``tokenmill conformance tpu`` on XLA:CPU).
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tokenmill.config import BucketConfig, EngineConfig
from tokenmill.engine.buckets import ShapeBuckets, pad_rows, pad_step, powers_of_two
from tokenmill.engine.input_batch import StepInputs
from tokenmill.hookspecs import hookimpl
from tokenmill.platform import Capabilities
from tokenmill.testing.tiny_models import make_tiny_model


def test_powers_of_two_end_at_the_limit():
    assert powers_of_two(16, 100) == (16, 32, 64, 100)
    assert powers_of_two(1, 1) == (1,)
    assert powers_of_two(16, 16) == (16,)


def test_buckets_from_config_and_validation():
    b = ShapeBuckets.from_config(BucketConfig(), 64, 4, 8)
    assert (b.tokens, b.seqs, b.widths) == ((16, 32, 64), (1, 2, 4), (1, 2, 4, 8))
    assert b.num_combinations == 3 * 3 * 4
    assert b.pick(17, 3, 1) == (32, 4, 1) and b.pick(64, 4, 8) == (64, 4, 8)
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        b.pick(65, 1, 1)
    with pytest.raises(ValueError, match="largest token bucket 32 is below the limit 64"):
        ShapeBuckets.from_config(BucketConfig(token_buckets=(16, 32)), 64, 4, 8)
    with pytest.raises(ValueError, match="token_buckets must be a non-empty tuple"):
        BucketConfig(token_buckets=[16])
    with pytest.raises(ValueError, match="seq_buckets must be a positive integer"):
        BucketConfig(seq_buckets=(0, 4))
    cfg = EngineConfig.from_kwargs("m", token_buckets=(8, 128), width_buckets=(4,))
    assert cfg.buckets == BucketConfig(token_buckets=(8, 128), width_buckets=(4,))


def _step(ids, pos, slots, qlens, slens, tables):
    width = max(len(t) for t in tables)
    return StepInputs(*(np.array(a, dtype=np.int64) for a in (ids, pos, slots, qlens, slens)),
                      torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32))


def test_pad_step_keeps_the_attention_contract():
    b = ShapeBuckets.from_config(BucketConfig(), 64, 4, 8)
    step = _step([5, 6, 7], [0, 1, 16], [112, 113, 48], [2, 1], [2, 17], [[7], [7, 3]])
    p = pad_step(b, step)
    assert p.block_tables.shape == (2, 2)
    assert p.input_ids.tolist() == [5, 6, 7] + [0] * 13 and p.positions.tolist() == [0, 1, 16] + [0] * 13
    assert p.slots.tolist() == [112, 113, 48] + [-1] * 13
    assert (p.query_lens.tolist(), p.seq_lens.tolist()) == ([2, 1], [2, 17])
    assert p.block_tables.tolist() == [[7, 0], [7, 3]]
    assert step.input_ids.tolist() == [5, 6, 7] and step.block_tables.shape == (2, 2)  # the runner's step is not touched
    p = pad_step(b, _step([1, 2, 3], [2, 3, 4], [1, 2, 3], [1, 1, 1], [3, 4, 5], [[1], [2], [3]]))
    assert (p.query_lens.tolist(), p.seq_lens.tolist(), p.block_tables.tolist()) == \
        ([1, 1, 1, 0], [3, 4, 5, 0], [[1], [2], [3], [0]])
    assert pad_rows(b, [4, 9, 11]) == [4, 9, 11, 4] and pad_rows(b, []) == []


# -- the engine on a static-shape platform -------------------------------------------------------

class _ShapeCompiler:
    """Wraps a model: every forward's input shapes form a graph signature, as an XLA-like compiler keys them."""

    def __init__(self, model, signatures: set):
        self._model = model
        self._signatures = signatures

    def forward(self, ids, positions, kv_caches, meta):
        self._signatures.add((tuple(ids.shape), tuple(meta.block_tables.shape), tuple(meta.seq_lens.shape)))
        return self._model.forward(ids, positions, kv_caches, meta)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _platform(static: bool):
    from tokenmill_cpu.platform import CpuPlatform

    class ShapeCountingCpu(CpuPlatform):
        name = "staticcpu" if static else "dynamiccpu"
        capabilities = Capabilities(dtypes=("float32",), static_shapes=static)

        def __init__(self):
            self.signatures: set = set()
            self.steps_ended = 0

        def wrap_model(self, model):
            return _ShapeCompiler(model, self.signatures)

        def step_end(self):
            self.steps_ended += 1

        def compile_count(self):
            return len(self.signatures)

    return ShapeCountingCpu()


def _engine(platform, **kwargs):
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.plugins import PluginManager

    pm = PluginManager(allowlist=[]).load()
    module = types.ModuleType("shape_counting")
    module.TOKENMILL_CONTRACT = "1.0"
    module.tokenmill_platforms = hookimpl(lambda: [platform])
    pm.register_module("shape_counting", module)
    config = EngineConfig.from_kwargs(str(make_tiny_model("llama")), device=platform.name, dtype="float32",
                                      block_size=16, max_num_batched_tokens=64, max_num_seqs=8, num_blocks=64,
                                      max_model_len=256, enable_prefix_caching=False, **kwargs)
    return EngineCore(config, plugin_manager=pm)


def _run(engine, prompts, max_tokens=6):
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = {}
    for i, p in enumerate(prompts):
        rid = f"{len(engine._seqs)}-{i}-{id(p)}"
        engine.add_request(rid, p, params)
        out[rid] = []
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id].extend(u.new_token_ids)
    return list(out.values())


PROMPTS = [list(range(5, 5 + n)) for n in (3, 11, 17, 30, 45, 9, 70, 2)]


def test_static_shape_engine_compiles_at_most_one_graph_per_bucket_and_matches_dynamic():
    static, dynamic = _platform(True), _platform(False)
    s_engine, d_engine = _engine(static), _engine(dynamic)
    assert s_engine.runner.buckets is not None and d_engine.runner.buckets is None
    got = _run(s_engine, PROMPTS)
    want = _run(d_engine, PROMPTS)
    assert got == want  # padding changes no token
    buckets = s_engine.runner.buckets
    assert static.compile_count() == len(buckets.seen) <= buckets.num_combinations
    assert dynamic.compile_count() > static.compile_count()  # unpadded, the shapes keep changing
    assert static.steps_ended == s_engine.stats().steps
    first = static.compile_count()
    assert _run(s_engine, PROMPTS) == want
    assert static.compile_count() == first  # the same workload again compiles nothing new


def test_static_shape_buckets_follow_the_config():
    static = _platform(True)
    engine = _engine(static, token_buckets=(64,), seq_buckets=(8,), width_buckets=(16,))
    assert engine.runner.buckets.num_combinations == 1
    _run(engine, PROMPTS[:4])
    assert static.compile_count() == 1


def _target_with(platform):
    from tokenmill.conformance.target import Target
    from tokenmill.plugins import PluginManager

    pm = PluginManager(allowlist=["cpu"]).load()
    module = types.ModuleType("shape_counting")
    module.TOKENMILL_CONTRACT = "1.0"
    module.tokenmill_platforms = hookimpl(lambda: [platform])
    pm.register_module("shape_counting", module)
    return Target("shape_counting", pm, module, platforms=[platform])


def test_conformance_measures_compilations_against_the_buckets():
    from tokenmill.conformance.e2e_checks import static_shape_check

    static = _platform(True)
    text = static_shape_check(_target_with(static), static)
    assert "W again: 0 new" in text and f"compiled {static.compile_count()} graphs" in text


def test_conformance_catches_a_shape_that_leaks_past_the_buckets():
    from tokenmill.conformance.e2e_checks import static_shape_check

    static = _platform(True)
    wrap = static.wrap_model

    def leaky(model):  # a "compiler" that also keys on a host value that changes every step
        inner = wrap(model)
        forward = inner.forward

        def fwd(ids, positions, kv_caches, meta):
            static.signatures.add(("max_seq_len", meta.max_seq_len))
            return forward(ids, positions, kv_caches, meta)
        inner.forward = fwd
        return inner

    static.wrap_model = leaky
    with pytest.raises(AssertionError, match="shapes leak past the buckets"):
        static_shape_check(_target_with(static), static)
