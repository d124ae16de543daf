"""The overlap scheduler: step N+1 is planned while step N runs, and the output is the same as without.

Each case runs one mixed workload twice, with ``overlap`` on and off, on one small checkpoint, and
compares every completion (tokens, text, finish reason, logprobs). The workload is built to hit the
places where planning one step ahead could go wrong: forced preemption (a small KV pool) of seeded
samplers, n>1 forks, stop strings ended by the frontend, penalties (the runner's own history),
prefix caching of a shared prefix, chunked prefill and a constrained (JSON) request.
"""
import json

import pytest

from tokenmill.guided import StructuredOutputsParams
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams
from tokenmill.testing import record_plan_events
from tokenmill.testing.tiny_models import make_tiny_model

SHARED = list(range(40, 90))  # a 50-token prefix that several prompts share


@pytest.fixture(scope="module")
def model():
    return str(make_tiny_model("llama"))


def _workload():
    prompts, params = [], []
    for i in range(14):
        prompt = (SHARED if i % 4 == 0 else []) + [(7 * i + j) % 200 + 3 for j in range(5 + 3 * i)]
        if i % 3 == 0:
            p = SamplingParams(max_tokens=24, temperature=0.9, seed=i, n=2, logprobs=2)
        elif i % 3 == 1:
            p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=["e"], presence_penalty=0.5,
                               repetition_penalty=1.2)
        else:
            p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=1)
        prompts.append({"prompt_token_ids": prompt})
        params.append(p)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prompts.append({"prompt_token_ids": [5, 6, 7, 8]})
    params.append(SamplingParams(max_tokens=40, temperature=0,
                                 structured_outputs=StructuredOutputsParams(json=json.dumps(schema))))
    return prompts, params


def _run(model, overlap: bool, **kw):
    llm = LLM(model, device="cpu", dtype="float32", overlap=overlap, max_model_len=256, **kw)
    events = record_plan_events(llm.engine.scheduler)
    prompts, params = _workload()
    outs = llm.generate(prompts, params)
    got = [[(c.text, list(c.token_ids), c.finish_reason) for c in o.outputs] for o in outs]
    lps = [[[sorted((t, lp.rank, lp.logprob) for t, lp in d.items()) for d in (c.logprobs or [])] for c in o.outputs]
           for o in outs]
    return (got, lps), llm, "".join(events)


def _close(a, b) -> bool:
    """Same logprob entries (tokens and ranks); values equal up to float32 rounding of other batch shapes."""
    flat_a = [e for req in a for comp in req for step in comp for e in step]
    flat_b = [e for req in b for comp in req for step in comp for e in step]
    return len(flat_a) == len(flat_b) and all(
        x[:2] == y[:2] and abs(x[2] - y[2]) < 1e-4 for x, y in zip(flat_a, flat_b))


@pytest.mark.parametrize("kw", [
    dict(kv_cache_memory=300_000, max_num_batched_tokens=32),  # ~18 blocks: preemption; small chunks
    dict(kv_cache_memory=4 << 20, max_num_batched_tokens=256),  # roomy: prefix hits, large batches
], ids=["preempting", "roomy"])
def test_overlap_output_equals_no_overlap(model, kw):
    (want, want_lp), plain, plain_events = _run(model, False, **kw)
    (got, got_lp), llm, events = _run(model, True, **kw)
    assert got == want
    assert _close(got_lp, want_lp)
    json.loads(got[-1][0][0])  # the constrained request still parses
    # overlap really planned ahead: some plan was made before the previous one's results were applied
    assert "SS" in events and "SS" not in plain_events.replace("SUS", "")
    assert llm.stats().prefix_hit_tokens >= 48  # the shared prefix was reused (3 of its blocks at least)
    if kw["kv_cache_memory"] < 1 << 20:
        assert plain.stats().num_preemptions > 0 and llm.stats().num_preemptions > 0
    else:  # no preemption: the same admissions, so the same prefix hits as without overlap
        assert llm.stats().prefix_hit_tokens == plain.stats().prefix_hit_tokens
    # nothing is left behind: blocks, runner states, in-flight steps
    llm.engine.step()
    assert not llm.engine.has_unfinished() and llm.engine.kv.num_used_blocks == 0
    assert llm.engine.runner.num_seq_states == 0


def test_abort_with_a_step_in_flight_frees_everything(model):
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=256, overlap=True)
    engine = llm.engine
    for i in range(4):
        engine.add_request(f"r{i}", list(range(3, 30 + i)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None  # a decode step is running while we abort
    for i in range(4):
        engine.abort(f"r{i}")
    while engine.has_unfinished():
        engine.step()
    engine.step()
    assert engine.kv.num_used_blocks == 0 and engine.runner.num_seq_states == 0


def test_abort_all_with_a_step_in_flight_frees_everything(model):
    """abort_all() (after a failed step) drains the step in flight; every state still reaches the runner."""
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=256, overlap=True)
    engine = llm.engine
    for i in range(4):
        engine.add_request(f"r{i}", list(range(3, 30 + i)), SamplingParams(max_tokens=4 + 8 * i, ignore_eos=True))
    for _ in range(8):  # r0 finishes; a later plan carries its id while a step is in flight
        engine.step()
    assert engine._inflight is not None
    assert sorted(engine.abort_all()) == ["r1", "r2", "r3"]
    assert engine._inflight is None and engine.kv.num_used_blocks == 0
    engine.step()  # the runner hears of the aborted sequences
    assert not engine.has_unfinished() and engine.runner.num_seq_states == 0


def test_no_overlap_flag_reaches_the_engine():
    import argparse

    from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert engine_kwargs(p.parse_args([]))["overlap"] is None  # the platform decides
    assert engine_kwargs(p.parse_args(["--overlap"]))["overlap"] is True
    assert engine_kwargs(p.parse_args(["--no-overlap"]))["overlap"] is False


def test_swap_preemption_steps_without_overlap(model):
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=256, preemption_mode="swap")
    assert llm.engine._overlap is False  # documented: swapping a sequence whose step is in flight is not undone
    assert LLM(model, device="cpu", dtype="float32", max_model_len=256, overlap=True).engine._overlap is True
    # the cpu platform computes on the host's cores: no async execution, so overlap is off unless asked for
    assert LLM(model, device="cpu", dtype="float32", max_model_len=256).engine._overlap is False
