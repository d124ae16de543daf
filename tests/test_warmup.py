"""The start-up warm-up: real steps through the engine, then nothing left behind."""
from tokenmill import LLM, SamplingParams
from tokenmill.engine.warmup import warm_up
from tokenmill.testing.tiny_models import make_tiny_model


def test_warm_up_runs_steps_and_leaves_the_engine_as_it_was():
    path = str(make_tiny_model("llama"))
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)]
    prompts = [{"prompt_token_ids": [5, 9, 13, 2, 7] * 8}, {"prompt_token_ids": [4, 4, 8, 1]}]
    fresh = LLM(model=path, dtype="float32")
    warmed = LLM(model=path, dtype="float32")
    engine = warmed.engine
    assert warm_up(engine) >= 2  # a prefill step and a decode step at least
    s = engine.stats()
    assert (s.steps, s.prompt_tokens, s.prompt_tokens_computed, s.generation_tokens) == (0, 0, 0, 0)
    assert (s.prefix_queries_tokens, s.prefix_hit_tokens, s.num_preemptions) == (0, 0, 0)
    assert engine.kv.num_used_blocks == 0 and engine.kv.num_cached_blocks == 0 and not engine.has_unfinished()
    engine.kv.check_invariants()
    for p in params:
        want = [o.outputs[0].token_ids for o in fresh.generate(prompts, p)]
        assert [o.outputs[0].token_ids for o in warmed.generate(prompts, p)] == want
    assert warmed.stats().prompt_tokens == fresh.stats().prompt_tokens
