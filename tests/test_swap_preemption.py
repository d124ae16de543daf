"""Preemption by swap: KV blocks go to a host swap space and come back instead of being recomputed.

The scheduler half runs on ids only, against a fake KV memory that plays the runner's
copies (swap-out, copy-on-write, swap-in, then the step's writes): every step, each
scheduled sequence's blocks must hold exactly its own tokens. The engine half compares
greedy tokens of swap mode with recompute mode (and HF) on a tiny model with forced
preemption, with prefix caching, chunked prefill, n > 1 and tensor parallelism.
"""
from __future__ import annotations

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.batch import RunnerOutput
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.swap_space import SwapSpace


class Params:
    min_tokens = 0
    stop_token_ids: list = []
    ignore_eos = True
    prompt_logprobs = None


class FakeKV:
    """Device blocks and host slots as lists of token ids, written the way the runner would."""

    def __init__(self, num_blocks, num_slots, bs):
        self.dev = [[None] * bs for _ in range(num_blocks)]
        self.host = [[None] * bs for _ in range(num_slots)]
        self.bs = bs

    def run(self, plan, seqs):
        for b, h in plan.swap_out:
            self.host[h] = list(self.dev[b])
        for s, d in plan.block_copies:
            self.dev[d] = list(self.dev[s])
        for h, b in plan.swap_in:
            self.dev[b] = list(self.host[h])
        out = RunnerOutput()
        for item in plan.seqs:
            seq = seqs[item.seq_id]
            table = seq.runner_blocks
            # every position before this chunk must already hold the sequence's own token
            for p in range(item.start):
                assert self.dev[table[p // self.bs]][p % self.bs] == seq.token_ids[p], (
                    f"seq {seq.request_id}: position {p} lost its KV (block {table[p // self.bs]})")
            for p in range(item.start, item.start + item.num_new):
                self.dev[table[p // self.bs]][p % self.bs] = seq.token_ids[p]
            if item.sample:
                nxt = (seq.token_ids[-1] * 7 + 3) % 97 + 1  # deterministic "model"
                out.sampled[item.seq_id] = [nxt] * item.num_samples
        return out


def _run(mode, num_blocks=7, num_slots=32, prefix=True, budget=12, n_seqs=4, prompt=9, max_tokens=10):
    bs = 4
    kv = KVCacheManager(num_blocks, bs, prefix)
    swap = SwapSpace(num_slots, bs) if mode == "swap" else None
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, preemption_mode=mode),
                      kv, 1024, swap)
    fake = FakeKV(num_blocks, num_slots, bs)
    seqs = {}
    for i in range(n_seqs):
        tokens = [1, 2, 3, 4, 5] + [10 + i] * (prompt - 5)  # a shared first block
        s = Sequence(str(i), tokens, len(tokens), Params(), max_tokens, eos_token_id=0)
        seqs[s.seq_id] = s
        sched.add(s)
    plans = []
    while sched.has_unfinished():
        plan = sched.schedule()
        assert not (plan.swap_out and plan.swap_in), "a step must not both swap out and in"
        plans.append(plan)
        sched.update(plan, fake.run(plan, seqs))
        kv.check_invariants()
        if swap is not None:
            swap.check_invariants()
        assert len(plans) < 2000
    return {s.request_id: s.output_token_ids for s in seqs.values()}, sched, plans


@pytest.mark.parametrize("prefix", [True, False])
def test_swap_keeps_every_block_and_matches_recompute(prefix):
    want, rsched, _ = _run("recompute", prefix=prefix)
    got, sched, plans = _run("swap", prefix=prefix)
    assert got == want
    assert sched.num_preemptions > 0
    assert sched.swap.blocks_out > 0 and sched.swap.blocks_in == sched.swap.blocks_out
    assert sched.swap.num_free == sched.swap.num_slots and sched.kv.num_used_blocks == 0
    # swapped sequences resume where they were: fewer tokens computed than with recompute
    computed = lambda ps: sum(p.num_tokens for p in ps)  # noqa: E731
    assert computed(plans) < computed(_run("recompute", prefix=prefix)[2])
    assert rsched.swap is None


def test_full_swap_space_falls_back_to_recompute():
    got, sched, _ = _run("swap", num_slots=3)
    assert got == _run("recompute")[0]
    assert sched.swap.num_full > 0, "a 3-slot swap space was meant to overflow"
    assert sched.swap.num_free == 3


def test_abort_while_swapped_out_frees_the_host_slots():
    bs = 4
    kv = KVCacheManager(4, bs, False)
    swap = SwapSpace(8, bs)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, preemption_mode="swap"), kv, 1024, swap)
    a = Sequence("a", list(range(1, 8)), 7, Params(), 20)
    b = Sequence("b", list(range(1, 8)), 7, Params(), 20)
    for s in (a, b):
        sched.add(s)
    out = RunnerOutput()
    for _ in range(6):
        plan = sched.schedule()
        out = RunnerOutput(sampled={i.seq_id: [5] for i in plan.seqs if i.sample})
        sched.update(plan, out)
        if len(swap):
            break
    assert len(swap) == 1 and swap.num_free < 8
    victim = b if swap.holds(b.seq_id) else a
    sched.abort(victim.request_id)
    assert swap.num_free == 8 and not swap.holds(victim.seq_id)
    swap.check_invariants()
    plan = sched.schedule()
    assert victim.seq_id in plan.finished  # the runner drops its state too


def test_swap_config_is_validated():
    with pytest.raises(ValueError, match="preemption_mode"):
        SchedulerConfig(preemption_mode="discard")
    from tokenmill.config import CacheConfig

    with pytest.raises(ValueError, match="swap_space"):
        CacheConfig(swap_space=0)
    with pytest.raises(ValueError, match="swap space"):
        Scheduler(SchedulerConfig(preemption_mode="swap"), KVCacheManager(4, 4), 64)


# -- the engine: swap against recompute on a tiny model -----------------------------------------

def _engine_prompts():
    import torch

    gen = torch.Generator().manual_seed(7)
    shared = [1] + torch.randint(4, 500, (20,), generator=gen).tolist()  # a prefix several prompts share
    return [shared + torch.randint(4, 500, (n,), generator=gen).tolist() for n in (3, 14, 25)] + \
        [[1] + torch.randint(4, 500, (30,), generator=gen).tolist()]


def _engine_tokens(path, prompts, n=1, **opts):
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", **opts)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, n=n)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("prefix,chunk,n", [(True, 8, 1), (False, 64, 2)])
def test_engine_swap_equals_recompute_and_hf(prefix, chunk, n):
    from tokenmill.testing import hf_greedy, make_tiny_model

    path = make_tiny_model("llama")
    prompts = _engine_prompts()
    opts = dict(num_blocks=9, block_size=8, max_num_batched_tokens=chunk, enable_prefix_caching=prefix)
    rec, want = _engine_tokens(path, prompts, n, **opts)
    swp, got = _engine_tokens(path, prompts, n, preemption_mode="swap", num_swap_blocks=64, **opts)
    assert got == want
    assert [toks[0] for toks in got] == hf_greedy(path, prompts, 24)
    s = swp.stats()
    assert s.num_preemptions > 0 and s.swapped_out_blocks > 0, "the 9-block pool was meant to force swapping"
    assert s.swapped_in_blocks == s.swapped_out_blocks and s.num_swapped == 0
    assert s.swap_space_full == 0
    # swapping back computes fewer tokens than recomputing
    assert s.prompt_tokens_computed < rec.stats().prompt_tokens_computed
    sched = swp.engine.scheduler
    assert sched.swap.num_free == sched.swap.num_slots == 64
    swp.engine.step()  # the runner hears of the last finished sequences
    assert swp.engine.kv.num_used_blocks == 0 and swp.engine.runner.num_seq_states == 0
    assert len(swp.engine.runner.swap.caches) == swp.engine.runner.num_layers


def test_engine_swap_space_full_falls_back_and_frees_everything():
    from tokenmill.testing import make_tiny_model

    path = make_tiny_model("llama")
    prompts = _engine_prompts()
    opts = dict(num_blocks=9, block_size=8, max_num_batched_tokens=64)
    _, want = _engine_tokens(path, prompts, **opts)
    llm, got = _engine_tokens(path, prompts, preemption_mode="swap", num_swap_blocks=2, **opts)
    assert got == want
    s = llm.stats()
    assert s.swap_space_full > 0 and s.num_swapped == 0
    assert llm.engine.scheduler.swap.num_free == 2 and llm.engine.kv.num_used_blocks == 0


def test_engine_abort_of_a_swapped_request_frees_its_slots():
    from tokenmill import SamplingParams
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.testing import make_tiny_model

    path = make_tiny_model("llama")
    engine = EngineCore(EngineConfig.from_kwargs(str(path), dtype="float32", num_blocks=9, block_size=8,
                                                 preemption_mode="swap", num_swap_blocks=64))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for i, p in enumerate(_engine_prompts()):
        engine.add_request(str(i), p, params)
    swap = engine.scheduler.swap
    for _ in range(200):
        engine.step()
        if len(swap):
            break
    assert len(swap), "no sequence was swapped out"
    victims = [s.request_id for s in engine.scheduler.waiting if swap.holds(s.seq_id)]
    for rid in victims:
        engine.abort(rid)
    assert swap.num_free == 64
    while engine.has_unfinished():
        engine.step()
    engine.step()  # the runner hears of the last finished sequences
    assert engine.kv.num_used_blocks == 0 and engine.runner.num_seq_states == 0


def test_engine_swap_with_tensor_parallel_ranks():
    """TP=2 (mp executor): every rank swaps its own shard; tokens equal TP=1 recompute."""
    from tokenmill.testing import make_tiny_model

    path = make_tiny_model("llama")
    prompts = _engine_prompts()
    opts = dict(num_blocks=9, block_size=8, max_num_batched_tokens=64)
    _, want = _engine_tokens(path, prompts, **opts)
    llm, got = _engine_tokens(path, prompts, preemption_mode="swap", num_swap_blocks=64,
                              tensor_parallel_size=2, distributed_timeout=120, **opts)
    try:
        assert got == want
        assert llm.stats().swapped_out_blocks > 0
    finally:
        llm.engine.shutdown()
