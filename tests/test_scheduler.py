"""Scheduler + KV bookkeeping with fake requests and a fake runner: no model, no torch."""
from __future__ import annotations

import random

import pytest

from tokenmill.engine.batch import RunnerOutput
from tokenmill.config import SchedulerConfig
from tokenmill.kv.manager import KVCacheManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import FinishReason, Sequence


class Params:
    """The stop-condition fields the scheduler reads from SamplingParams."""

    def __init__(self, **kw):
        self.min_tokens = kw.get("min_tokens", 0)
        self.stop_token_ids = kw.get("stop_token_ids", [])
        self.ignore_eos = kw.get("ignore_eos", True)
        self.prompt_logprobs = None


def make_seq(rid, prompt_len, max_tokens=4, **kw):
    seq = Sequence(str(rid), list(range(1, prompt_len + 1)), prompt_len, Params(**kw), max_tokens, eos_token_id=0)
    _ALL[seq.seq_id] = seq
    return seq


_ALL: dict[int, Sequence] = {}


@pytest.fixture(autouse=True)
def _register_children(monkeypatch):
    """Children forked by the scheduler join the test's registry too."""
    fork = Sequence.fork

    def registered(self, *args, **kw):
        child = fork(self, *args, **kw)
        _ALL[child.seq_id] = child
        return child

    monkeypatch.setattr(Sequence, "fork", registered)


def seq_of(item) -> Sequence:
    """The test's own Sequence behind a step entry (the step message carries only ids)."""
    return _ALL[item.seq_id]


def fake_runner(plan, next_token=lambda seq: 7):
    """Sample one token (or num_samples) for every sequence whose chunk reaches its end."""
    out = RunnerOutput()
    for item in plan.seqs:
        if item.sample:
            out.sampled[item.seq_id] = [next_token(seq_of(item))] * item.num_samples
    return out


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, prefix=True, max_len=1024):
    kv = KVCacheManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv, max_len), kv


def run_all(sched, kv, seqs, limit=10_000, check=None):
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_unfinished():
        plan = sched.schedule()
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        assert len(plan.seqs) <= sched.config.max_num_seqs
        steps.append(plan)
        sched.update(plan, fake_runner(plan))
        kv.check_invariants()
        if check:
            check(plan)
        assert len(steps) < limit, "scheduler made no progress"
    return steps


def test_budget_respected_and_chunked_prefill():
    sched, kv = make(budget=10)
    seq = make_seq("a", 25, max_tokens=3)
    steps = run_all(sched, kv, [seq])
    prefill = [p.seqs[0].num_new for p in steps[:3]]
    assert prefill == [10, 10, 5]
    assert [p.seqs[0].sample for p in steps[:3]] == [False, False, True]
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 3
    assert kv.num_used_blocks == 0


def test_prefill_and_decode_mixed_in_one_step():
    sched, kv = make(budget=8)
    a, b = make_seq("a", 4, max_tokens=5), make_seq("b", 20, max_tokens=2)
    sched.add(a)
    sched.update(p := sched.schedule(), fake_runner(p))  # a prefilled
    sched.add(b)
    plan = sched.schedule()
    kinds = {seq_of(item).request_id: item.num_new for item in plan.seqs}
    assert kinds == {"a": 1, "b": 7}  # a decodes, b takes the rest of the budget as a chunk
    assert plan.num_tokens == 8


def test_max_num_seqs():
    sched, kv = make(budget=1000, max_seqs=3)
    seqs = [make_seq(i, 5, max_tokens=2) for i in range(7)]
    run_all(sched, kv, seqs)
    assert all(s.is_finished for s in seqs)


def test_preemption_newest_first_and_resumption():
    # 6 blocks of 4 tokens; three sequences of 8-token prompts growing to 16 tokens cannot all fit.
    sched, kv = make(num_blocks=6, block_size=4, budget=64, prefix=False)
    seqs = [make_seq(i, 8, max_tokens=8) for i in range(3)]
    preempted_order = []

    def check(plan):
        for s in seqs:
            if s.num_preemptions and s.request_id not in preempted_order:
                preempted_order.append(s.request_id)

    run_all(sched, kv, seqs, check=check)
    assert sched.num_preemptions > 0
    assert preempted_order[0] == "2"  # the newest goes first
    for s in seqs:
        assert s.is_finished and s.num_output_tokens == 8
        assert s.token_ids[8:] == [7] * 8
    assert kv.num_free_blocks == 6


def test_abort_frees_every_block():
    sched, kv = make(num_blocks=32, budget=6, prefix=False)
    seqs = [make_seq(i, 10, max_tokens=50) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for _ in range(5):
        sched.update(p := sched.schedule(), fake_runner(p))
    assert kv.num_used_blocks > 0
    for s in seqs:
        sched.abort(s.request_id)
        kv.check_invariants()
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 32
    assert not sched.has_unfinished()
    assert all(s.finish_reason is FinishReason.ABORT for s in seqs)


def test_abort_while_waiting_and_unknown_id():
    sched, kv = make()
    s = make_seq("w", 5)
    sched.add(s)
    assert sched.abort("w") == [s]
    assert sched.abort("nope") == []
    assert not sched.has_unfinished()


def test_stop_conditions():
    sched, kv = make()
    eos = make_seq("eos", 4, max_tokens=10, ignore_eos=False)
    stop = make_seq("stop", 4, max_tokens=10, stop_token_ids=[7])
    mint = make_seq("min", 4, max_tokens=10, stop_token_ids=[7], min_tokens=3)
    for s in (eos, stop, mint):
        sched.add(s)
    while sched.has_unfinished():
        plan = sched.schedule()
        sched.update(plan, fake_runner(plan, lambda seq: 0 if seq.request_id == "eos" else 7))
    assert eos.finish_reason is FinishReason.STOP and eos.output_token_ids == [0]
    assert stop.finish_reason is FinishReason.STOP and stop.stop_reason == 7 and stop.num_output_tokens == 1
    assert mint.num_output_tokens == 3


def test_max_model_len_caps_generation():
    sched, kv = make(max_len=10)
    s = make_seq("x", 8, max_tokens=100)
    run_all(sched, kv, [s])
    assert s.num_tokens == 10 and s.finish_reason is FinishReason.LENGTH


def test_fork_n_greater_than_one_shares_prompt_blocks():
    sched, kv = make(num_blocks=32, block_size=4, budget=64)
    s = make_seq("n", 10, max_tokens=3)
    s.pending_forks = 2
    sched.add(s)
    plan = sched.schedule()
    assert plan.seqs[0].num_samples == 3
    sched.update(plan, fake_runner(plan))
    assert len(sched.running) == 3
    tables = [kv.block_table(x.seq_id) for x in sched.running]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # full prompt blocks shared
    while sched.has_unfinished():
        sched.update(p := sched.schedule(), fake_runner(p))
        kv.check_invariants()
    assert kv.num_used_blocks == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_accounting(seed):
    rng = random.Random(seed)
    sched, kv = make(num_blocks=24, block_size=4, budget=rng.choice([4, 9, 32]), max_seqs=rng.choice([2, 5, 16]))
    seqs = [make_seq(i, rng.randint(1, 30), max_tokens=rng.randint(1, 12)) for i in range(12)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        sched.update(plan, fake_runner(plan))
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
        kv.check_invariants()
        steps += 1
        assert steps < 5000
    assert kv.num_used_blocks == 0
    for s in seqs:
        assert s.is_finished
        if s.finish_reason is FinishReason.LENGTH:
            assert s.num_output_tokens == s.max_tokens
