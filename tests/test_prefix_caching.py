"""Automatic prefix sharing through the whole engine: same outputs, fewer computed tokens."""
from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path():
    return str(make_tiny_model("llama", max_position_embeddings=1024))


def _prompts(seed, n, prefix_len, suffix=(3, 12)):
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(4, 500) for _ in range(prefix_len - 1)]
    return [prefix + [rng.randrange(4, 500) for _ in range(rng.randint(*suffix))] for _ in range(n)]


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_on_equals_off_with_evictions_and_preemptions(path):
    prompts = _prompts(0, 12, 70) + _prompts(1, 12, 40)
    random.Random(2).shuffle(prompts)
    batch = [{"prompt_token_ids": p} for p in prompts]
    off = LLM(model=path, enable_prefix_caching=False).generate(batch, GREEDY)
    on_big = LLM(model=path)
    # A pool of 14 blocks of 16 tokens: prefixes get evicted and sequences preempted.
    on_small = LLM(model=path, num_blocks=14, max_num_batched_tokens=64)
    got_big = on_big.generate(batch, GREEDY)
    got_small = on_small.generate(batch, GREEDY)
    assert _ids(got_big) == _ids(off)
    assert _ids(got_small) == _ids(off)
    assert on_big.stats().prefix_hit_tokens > 0
    s = on_small.stats()
    assert s.num_preemptions > 0 and on_small.engine.kv.stats.evicted_blocks > 0
    assert on_small.engine.kv.num_used_blocks == 0
    on_small.engine.kv.check_invariants()


def test_hundred_requests_share_a_500_token_prefix(path):
    llm = LLM(model=path, block_size=16)
    prompts = _prompts(3, 100, 500, suffix=(1, 12))
    suffixes = sum(len(p) - 500 for p in prompts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=2, temperature=0))
    computed = llm.stats().prompt_tokens_computed
    assert computed <= 500 + suffixes + 16 * 100, computed
    assert sum(o.num_cached_tokens for o in outs) >= 99 * 496
    ref = LLM(model=path, enable_prefix_caching=False).generate(
        [{"prompt_token_ids": p} for p in prompts[:5]], SamplingParams(max_tokens=2, temperature=0))
    assert _ids(outs[:5]) == _ids(ref)


def test_multi_turn_recomputes_only_new_messages(path):
    llm = LLM(model=path)
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "You are a helpful assistant that answers questions about Python. " * 3}]
    prev_len = 0
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question number {turn}: what does the module os do?"})
        before = llm.stats().prompt_tokens_computed
        out = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        computed = llm.stats().prompt_tokens_computed - before
        prompt_len = len(out.prompt_token_ids)
        if turn:
            # the previous turn's prompt comes from the cache (all its full blocks); only the new
            # messages (the assistant's reply, re-tokenized from text, and the new question) are computed
            assert out.num_cached_tokens >= prev_len - 15
            assert computed == prompt_len - out.num_cached_tokens
            assert computed <= prompt_len - prev_len + 15
        prev_len = prompt_len
        messages.append({"role": "assistant", "content": out.outputs[0].text})
        assert tok  # the chat template renders the history


def test_salted_requests_never_share(path):
    llm = LLM(model=path)
    prompt = {"prompt_token_ids": _prompts(4, 1, 100)[0]}
    first = llm.generate([prompt], GREEDY, cache_salt="tenant-a")[0]
    same = llm.generate([prompt], GREEDY, cache_salt="tenant-a")[0]
    other = llm.generate([prompt], GREEDY, cache_salt="tenant-b")[0]
    unsalted = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens == 96
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert _ids([first]) == _ids([same]) == _ids([other]) == _ids([unsalted])


def test_n_greater_than_one_forks_share_prompt_blocks(path):
    llm = LLM(model=path)
    prompt = _prompts(5, 1, 40)[0]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(n=4, max_tokens=20, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert len(out.outputs) == 4
    # the prompt ran through the model once, not four times
    assert llm.stats().prompt_tokens_computed == len(prompt)
    assert llm.engine.kv.num_used_blocks == 0
    llm.engine.kv.check_invariants()


def test_a_prompt_cached_whole_computes_one_token_and_caches_what_it_generates(path):
    llm = LLM(model=path, block_size=16)
    prompt = _prompts(6, 1, 64, suffix=(0, 0))[0]  # exactly 4 blocks
    first = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
    before = llm.stats().prompt_tokens_computed
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
    assert again.num_cached_tokens == 63 and llm.stats().prompt_tokens_computed - before == 1
    assert _ids([again]) == _ids([first])
    # A sampled continuation of the cached prompt: its generated block is cached after it.
    sampled = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert sampled.num_cached_tokens == 63
    follow = prompt + list(sampled.outputs[0].token_ids[:16])
    assert llm.generate([{"prompt_token_ids": follow}], GREEDY)[0].num_cached_tokens == 79
    # n > 1 on a prompt cached whole: the forks share the copied block until it is swapped back.
    forks = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert len(forks.outputs) == 3 and forks.num_cached_tokens == 63
    assert llm.engine.kv.num_used_blocks == 0
    llm.engine.kv.check_invariants()
