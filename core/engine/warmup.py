"""Throwaway requests through the real step loop before a server takes traffic.

The first steps of a fresh process pay one-time costs that no later step pays: kernel
libraries compile code for the shapes they first meet (oneDNN's JIT), buffers and thread pools
are created, the sampler's paths run for the first time. Measured on llama20m in bfloat16 on
the cpu platform: the first 128-token request took 61 ms to its first token (34 ms after this
warm-up) against 5-15 ms for the next ones. ``tokenmill
serve`` runs :func:`warm_up` once before it reports ready, as vLLM runs its dummy batches at
start-up; the engine is left exactly as it was: no blocks held or cached, every counter at zero.
"""
from __future__ import annotations

from tokenmill.sampling_params import SamplingParams

#: Tokens in the warm-up's long prompt (at most ``max_num_batched_tokens`` and the model length).
LONG_PROMPT = 256
#: Short prompts beside it: with the long one they make a prefill step, then a decode step of this many rows.
SHORT_PROMPTS = 8


def warm_up(engine) -> int:
    """Run one long and :data:`SHORT_PROMPTS` short prompts for two tokens each (greedy, and one
    seeded sample), then forget them; returns the steps it took."""
    sched = engine.config.scheduler
    vocab = max(2, engine.vocab_size - 1)
    # half the KV pool for the long prompt, half for the short ones (one block each), so a small pool
    # neither refuses nor preempts them
    pool, bs = engine.num_kv_tokens, engine.kv.block_size
    n_long = max(1, min(LONG_PROMPT, engine.max_model_len - 2, sched.max_num_batched_tokens, pool // 2 - bs))
    n_short = max(0, min(SHORT_PROMPTS, sched.max_num_seqs - 1, pool // 2 // bs - 1))
    prompts = [[1 + (7 * i) % vocab for i in range(n_long)]]
    prompts += [[1 + (13 * i + j) % vocab for i in range(max(1, min(8, bs - 2)))] for j in range(n_short)]
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=2, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"warmup-{i}", ids, sampled if i == 1 else greedy)
    steps = 0
    while engine.has_unfinished() and steps < 64:
        engine.step()
        steps += 1
    engine.forget_history()
    return steps
