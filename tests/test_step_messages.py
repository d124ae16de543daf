"""The step messages are compact (ids and counts, no engine objects) and the runner's persistent
per-sequence state follows them through forks, preemption, aborts and prefix hits."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.batch import NewSeq, ScheduledSeq, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.testing.tiny_models import make_tiny_model


def _walk(obj):
    """Every value reachable from a step message (dataclass fields, lists, tuples, dicts)."""
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _walk(x)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k)
            yield from _walk(v)


class Recorder:
    """Wraps the runner's execute to keep every plan it receives (as it was sent, via pickle)."""

    def __init__(self, engine):
        self.plans: list[SchedulerOutput] = []
        self.sizes: list[int] = []
        self._execute = engine.runner.execute
        engine.runner.execute = self

    def __call__(self, plan):
        blob = pickle.dumps(plan)
        self.sizes.append(len(blob))
        self.plans.append(pickle.loads(blob))
        return self._execute(pickle.loads(blob))  # the runner sees only what a remote rank would


@pytest.fixture(scope="module")
def model():
    return str(make_tiny_model("llama"))


def test_messages_carry_no_engine_objects_and_send_params_once(model):
    llm = LLM(model=model, dtype="float32")
    rec = Recorder(llm.engine)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model=model, dtype="float32").generate(
        ["def main(", "import os\n", "class A:"], greedy)]
    got = [o.outputs[0].token_ids for o in llm.generate(["def main(", "import os\n", "class A:"], greedy)]
    assert got == expected  # the runner fed only pickled messages produces the same tokens
    seen_new = []
    for plan in rec.plans:
        for value in _walk(plan):
            assert not isinstance(value, Sequence)
        seen_new += [ns.seq_id for ns in plan.new_seqs]
        for item in plan.seqs:
            assert isinstance(item, ScheduledSeq)
    assert len(seen_new) == len(set(seen_new)) == 3  # each sequence's params and prompt travel once
    decode_plans = [p for p in rec.plans if all(item.num_new == 1 for item in p.seqs)]
    assert decode_plans and all(not p.new_seqs for p in decode_plans)
    # a decode step of 3 sequences is a few hundred bytes, whatever the prompt length
    assert max(rec.sizes[-3:]) < 1500
    llm.engine.step()  # the next step's message tells the runner which sequences ended
    assert llm.engine.runner.num_seq_states == 0


def test_runner_state_follows_forks_aborts_and_preemption(model):
    llm = LLM(model=model, dtype="float32", num_blocks=10, block_size=4, enable_prefix_caching=False)
    rec = Recorder(llm.engine)
    prompts = ["def main(x):", "import os, sys\n", "class Foo(Bar):", "for i in range(3):"]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    roomy = LLM(model=model, dtype="float32", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert llm.stats().num_preemptions > 0, "the small pool was meant to force preemption"
    assert got == want
    resent = [ns.seq_id for p in rec.plans for ns in p.new_seqs]
    assert len(resent) > len(set(resent))  # preempted sequences were sent again in full
    assert all(isinstance(ns, NewSeq) for p in rec.plans for ns in p.new_seqs)
    llm.engine.step()
    assert llm.engine.runner.num_seq_states == 0

    # n > 1: children are made by the runner from the parent's sample; none outlive the request
    out = llm.generate(["def main("], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))[0]
    alone = roomy.generate(["def main("], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=3,
                                                         ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs]
    assert any(item.child_seq_ids for p in rec.plans for item in p.seqs)
    llm.engine.step()
    assert llm.engine.runner.num_seq_states == 0

    # an abort mid-flight drops the runner's copy too
    engine = llm.engine
    engine.add_request("x", list(range(5, 20)), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.runner.num_seq_states == 1
    engine.abort("x")
    engine.step()  # an empty step still delivers the 'finished' list
    assert engine.runner.num_seq_states == 0 and engine.kv.num_used_blocks == 0


def test_prefix_hit_sends_the_whole_table_once(model):
    llm = LLM(model=model, dtype="float32", block_size=4)
    rec = Recorder(llm.engine)
    shared = "def shared_prefix_function(argument_one, argument_two):\n    return"
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = llm.generate([shared + " 1"], p)[0].outputs[0].token_ids
    rec.plans.clear()
    again = llm.generate([shared + " 1"], p)[0]
    assert again.outputs[0].token_ids == first and again.num_cached_tokens > 0
    entry = rec.plans[0].seqs[0]
    assert entry.blocks_from == 0 and entry.start == again.num_cached_tokens
    assert len(entry.new_blocks) * 4 >= entry.start + entry.num_new
    assert all(item.blocks_from > 0 for plan in rec.plans[1:] for item in plan.seqs)
