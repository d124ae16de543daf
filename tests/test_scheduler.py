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


# -- oversubscription: any load whose every single sequence fits the pool completes ----------------
def content_token(seq) -> int:
    """A token that depends on the whole sequence so far, so that a lost or reordered token shows."""
    return (sum(t * (i + 1) for i, t in enumerate(seq.token_ids)) % 97) + 2


def drive(sched, kv, seqs, limit=20_000):
    """Run to completion, checking after every step that no waiting sequence holds a block."""
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        for w in sched.waiting:
            assert kv.num_blocks_of(w.seq_id) == 0, f"waiting sequence {w.request_id} holds blocks"
        sched.update(plan, fake_runner(plan, content_token))
        kv.check_invariants()
        steps += 1
        assert steps < limit, "scheduler made no progress"
    assert kv.num_used_blocks == 0
    return steps


def new_seq(rid, prompt, max_tokens):
    seq = Sequence(rid, list(prompt), len(prompt), Params(), max_tokens, eos_token_id=0)
    _ALL[seq.seq_id] = seq
    return seq


def outputs_of(seqs):
    return {s.request_id: s.output_token_ids for s in seqs}


def alone(prompts, max_tokens, **make_kw):
    """Each prompt run by itself on a fresh scheduler: the reference outputs."""
    out = {}
    for rid, prompt in prompts.items():
        sched, kv = make(**make_kw)
        seq = new_seq(rid, prompt, max_tokens)
        drive(sched, kv, [seq])
        out[rid] = seq.output_token_ids
    return out


def seqs_for(prompts, max_tokens):
    return [new_seq(rid, p, max_tokens) for rid, p in prompts.items()]


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("same_prompt", [True, False])
def test_issue_reproduction_four_long_sequences_complete(prefix, same_prompt):
    # The issue's numbers: 80 blocks of 16, four 200-token prompts, 200 tokens each (369+ tokens, 24
    # blocks a sequence): all four fit one at a time, not together.
    prompts = {str(i): [(t + (0 if same_prompt else 7 * i)) % 90 + 3 for t in range(200)] for i in range(4)}
    kw = dict(num_blocks=80, block_size=16, budget=2048, max_seqs=256, prefix=prefix)
    sched, kv = make(**kw)
    seqs = seqs_for(prompts, 200)
    drive(sched, kv, seqs)
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 200 for s in seqs)
    assert outputs_of(seqs) == alone(prompts, 200, **kw)


@pytest.mark.parametrize("prefix", [True, False])
def test_thirty_two_concurrent_against_a_cache_ten_times_too_small(prefix):
    # 32 sequences of 40 + 24 tokens (16 blocks of 4 each, 512 in all) on 52 blocks, with shared prefixes.
    rng = random.Random(3)
    heads = [[rng.randrange(3, 90) for _ in range(16)] for _ in range(3)]
    prompts = {str(i): heads[i % 3] + [rng.randrange(3, 90) for _ in range(24)] for i in range(32)}
    kw = dict(num_blocks=52, block_size=4, budget=64, max_seqs=32, prefix=prefix)
    sched, kv = make(**kw)
    seqs = seqs_for(prompts, 24)
    drive(sched, kv, seqs)
    assert sched.num_preemptions > 0
    assert outputs_of(seqs) == alone(prompts, 24, **kw)


@pytest.mark.parametrize("seed", range(12))
def test_random_oversubscribed_loads_complete_equal_to_one_at_a_time(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(6, 30)
    chunked = rng.random() < 0.7
    budget = rng.choice([8, 16, 64]) if chunked else 64
    kw = dict(num_blocks=num_blocks, block_size=bs, budget=budget, max_seqs=rng.choice([2, 4, 64]),
              prefix=rng.random() < 0.7)
    heads = [[rng.randrange(3, 90) for _ in range(rng.randint(0, 3 * bs))] for _ in range(3)]
    prompts, limits = {}, {}
    for i in range(rng.randint(2, 24)):
        total = rng.randint(2, num_blocks * bs)  # prompt + output fit the pool on their own
        head = rng.choice(heads)[: total - 1]
        tail = [rng.randrange(3, 90) for _ in range(rng.randint(1, total - len(head)))]
        prompts[str(i)] = (head + tail)[:min(total - 1, budget)]
        limits[str(i)] = total - len(prompts[str(i)])
    sched, kv = make(**kw)
    sched.config = SchedulerConfig(max_num_seqs=kw["max_seqs"], max_num_batched_tokens=budget,
                                   enable_chunked_prefill=chunked)
    seqs = [new_seq(rid, p, limits[rid]) for rid, p in prompts.items()]
    drive(sched, kv, seqs)
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == limits[s.request_id]
        ref_sched, ref_kv = make(**kw)
        ref = new_seq(s.request_id, prompts[s.request_id], limits[s.request_id])
        drive(ref_sched, ref_kv, [ref])
        assert s.output_token_ids == ref.output_token_ids, s.request_id


def test_waiting_sequence_does_not_pin_its_cached_prefix():
    # The cached prefix of a waiting sequence stays evictable until it is admitted.
    sched, kv = make(num_blocks=8, block_size=4, budget=64)
    first = make_seq("a", 12, max_tokens=1)
    drive(sched, kv, [first])
    assert kv.num_cached_blocks == 3
    big = new_seq("big", range(100, 124), 8)  # 8 blocks: the whole pool, nothing shared
    same = make_seq("same", 12, max_tokens=2)  # shares a's prefix, waits behind big
    sched.add(big)
    sched.add(same)
    plan = sched.schedule()
    assert kv.num_blocks_of(same.seq_id) == 0 and same in sched.waiting
    sched.update(plan, fake_runner(plan, content_token))
    steps = drive(sched, kv, [])
    assert steps > 0 and big.num_output_tokens == 8 and same.num_output_tokens == 2


def test_recompute_progresses_without_chunked_prefill():
    # Prompts fit the budget, but after a preemption prompt + output (the recompute) does not.
    sched, kv = make(num_blocks=6, block_size=4, budget=8, prefix=False)
    sched.config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, enable_chunked_prefill=False)
    seqs = [new_seq(str(i), range(10 * i, 10 * i + 4), 16) for i in range(3)]
    drive(sched, kv, seqs, limit=2000)
    assert sched.num_preemptions > 0
    assert all(s.num_output_tokens == 16 for s in seqs)
    assert any(s.num_preemptions for s in seqs)
