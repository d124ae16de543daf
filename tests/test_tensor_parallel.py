"""Tensor parallelism over torch.distributed (gloo on this CPU): TP=2 against HF and TP=1.

Two ranks on one machine (the multiprocess executor: rank 0 in this process, one worker
process) for every architecture, including Qwen3's single KV head (replicated on both
ranks) and Mixtral's experts; prefix caching, chunked prefill and preemption with TP=2;
a head count the rank count does not divide; quantization (refused, no rank left
behind); a rank killed mid-service. The Ray executor
across two nodes of a local Ray cluster lives in ``test_ray_executor.py``.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.executor import RankDied
from tokenmill.testing import ARCHS, hf_greedy, make_tiny_model

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _prompts():
    gen = torch.Generator().manual_seed(99)
    return [[1] + torch.randint(4, 512, (n - 1,), generator=gen).tolist() for n in (6, 23, 41)]


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tp2_greedy_equals_hf(arch):
    path = make_tiny_model(arch)
    prompts = _prompts()
    llm = LLM(str(path), num_blocks=64, tensor_parallel_size=2, distributed_timeout=120)
    try:
        assert llm.engine.executor.procs, "TP=2 must run a second rank in a worker process"
        assert llm.engine.runner.spec.num_heads == 2  # 4 query heads split over 2 ranks
        assert _tokens(llm, prompts) == hf_greedy(path, prompts, NEW_TOKENS)
    finally:
        llm.engine.shutdown()


def test_tp2_with_prefix_caching_chunking_and_preemption():
    """Shared prefixes, prompts chunked 8 tokens at a time, and a KV pool too small for the batch."""
    path = make_tiny_model("llama", tie_word_embeddings=True)
    base = _prompts()
    prompts = [base[2] + [7, 8, 9], base[2] + [10], base[1], base[2] + [11, 12]]
    opts = dict(num_blocks=14, block_size=8, max_num_batched_tokens=8, max_num_seqs=4)
    one = LLM(str(path), **opts)
    expected = [_tokens(one, [p])[0] for p in prompts]  # one at a time, TP=1
    llm = LLM(str(path), tensor_parallel_size=2, distributed_timeout=120, **opts)
    try:
        assert _tokens(llm, prompts) == expected
        stats = llm.engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
        assert _tokens(llm, prompts[:2]) == expected[:2]  # again, now from the prefix cache
        assert llm.engine.kv.num_used_blocks == 0
    finally:
        llm.engine.shutdown()


def test_indivisible_heads_fail_clearly():
    path = make_tiny_model("llama")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide the number of attention heads \(4\)"):
        LLM(str(path), num_blocks=16, tensor_parallel_size=3)
    assert time.monotonic() - t0 < 30  # refused before any rank starts


def test_quantization_with_tensor_parallelism_is_refused_and_leaves_no_rank_behind():
    path = make_tiny_model("llama")
    with pytest.raises(ValueError, match=r"quantization \(int8: .*\) is not supported with tensor parallelism yet "
                                         r"\(tensor_parallel_size=2\); use one rank"):
        LLM(str(path), num_blocks=16, tensor_parallel_size=2, quantization="int8", distributed_timeout=60)
    workers = [pid for pid in _children(os.getpid()) if "tokenmill.executor.worker" in _cmdline(pid)]
    assert workers == []


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:  # gone already
        return ""


def test_dead_rank_fails_the_step_with_a_clear_error():
    path = make_tiny_model("qwen2")
    llm = LLM(str(path), num_blocks=32, tensor_parallel_size=2, distributed_timeout=120)
    try:
        assert _tokens(llm, _prompts()[:1])
        worker = llm.engine.executor.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        t0 = time.monotonic()
        with pytest.raises(RankDied, match=r"rank 1 died .*exit code -9"):
            llm.generate(_prompts()[:1], GREEDY)
        assert time.monotonic() - t0 < 25  # bounded by the health check, not a hung collective
        with pytest.raises(RankDied):
            llm.engine.executor.check_health()
    finally:
        llm.engine.shutdown()


def test_tp2_structured_output_follows_the_schema():
    """Rank 0 masks and samples, the other ranks follow its tokens (no jump-forward with TP).

    Not compared token for token with TP=1: on this random model the whitespace tokens the
    grammar allows between JSON tokens can score within rounding of each other, and TP's partial
    sums round differently (unconstrained greedy output is compared above).
    """
    import json

    import jsonschema

    from tokenmill.guided.params import StructuredOutputsParams

    path = make_tiny_model("llama")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    params = SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=schema))
    llm = LLM(str(path), num_blocks=64, tensor_parallel_size=2, distributed_timeout=120)
    try:
        outs = [o.outputs[0] for o in llm.generate(_prompts()[:2], params)]
        assert all(o.finish_reason == "stop" for o in outs)
        for o in outs:
            jsonschema.validate(json.loads(o.text), schema)
        assert llm.engine.kv.num_used_blocks == 0
    finally:
        llm.engine.shutdown()


def test_server_with_a_dead_rank_fails_requests_and_reports_unhealthy():
    import httpx

    from api_conftest import SMALL_ENGINE, _children, running_server, wait_for

    path = str(make_tiny_model("llama"))
    body = {"model": path, "prompt": "hello", "max_tokens": 4}
    with running_server([path, *SMALL_ENGINE, "-tp", "2", "--distributed-timeout", "120"]) as server:
        assert httpx.post(server.base_url + "/completions", json=body, timeout=60).status_code == 200
        core = server.core_pid()
        workers = [pid for pid in _children(core)
                   if b"tokenmill.executor.worker" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        resp = httpx.post(server.base_url + "/completions", json=body, timeout=60)
        assert resp.status_code >= 500 and resp.json()["error"]["message"]
        wait_for(lambda: httpx.get(server.url + "/health", timeout=5).status_code == 503, timeout=30)
        assert "rank 1 died" in httpx.get(server.url + "/health", timeout=5).text + server.log()


def test_each_rank_holds_only_its_shard_of_the_weights():
    """TP=2: rank 0's parameters are its half of every split tensor, not the whole model."""
    path = make_tiny_model("llama")
    whole = LLM(str(path), num_blocks=32, reference_ops=True)
    full = {n: p.numel() for n, p in whole.engine.runner.model.named_parameters()}
    width = {n: p.shape[-1] for n, p in whole.engine.runner.model.named_parameters()}
    llm = LLM(str(path), num_blocks=32, tensor_parallel_size=2, distributed_timeout=120, reference_ops=True)
    try:
        shard = {n: p.numel() for n, p in llm.engine.executor.driver.model.named_parameters()}
        assert shard.keys() == full.keys()
        split = [n for n in full if n.endswith("_proj.weight") or n.endswith(("embed_tokens.weight", "lm_head.weight"))]
        # half of each split tensor, give or take the one padding row of an odd vocabulary
        assert split and all(2 * shard[n] <= full[n] + 2 * width[n] for n in split), \
            {n: (shard[n], full[n]) for n in split}
        assert sum(shard.values()) < 0.6 * sum(full.values())
    finally:
        llm.engine.shutdown()
