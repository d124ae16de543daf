"""The engine end to end against HF transformers: greedy tokens identical, logprobs close.

Every architecture runs three ways: plain, with chunked prefill forced (a tiny token budget),
and with preemption forced (a KV pool too small for the batch). Outputs must not change.
"""
from __future__ import annotations

import math

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral"]
NEW_TOKENS = 32
LOGPROB_ATOL = 1e-4  # float32, same weights: differences come from summation order only

TEXTS = [
    "def fibonacci(n):\n    return",
    "The quick brown fox",
    "import os\nimport sys\n\nclass Config:\n    \"\"\"Settings for the application, read from the environment.\"\"\"\n",
    "x",
]


@pytest.fixture(scope="module", params=ARCHS)
def reference(request):
    """(model dir, prompts as token ids, HF greedy tokens, HF logprobs of those tokens) per architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(make_tiny_model(request.param))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(t) for t in TEXTS]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=tok.pad_token_id)
        new = out.sequences[0, len(p):].tolist()
        tokens.append(new)
        logprobs.append([torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, new)])
    return path, prompts, tokens, logprobs


def _generate(path, prompts, **engine):
    llm = LLM(model=path, dtype="float32", **engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, outs


@pytest.mark.parametrize("mode", ["plain", "chunked", "preempt"])
def test_greedy_matches_hf(reference, mode):
    path, prompts, hf_tokens, hf_logprobs = reference
    engine = {"plain": {}, "chunked": {"max_num_batched_tokens": 7},
              "preempt": {"num_blocks": 8, "block_size": 16, "enable_prefix_caching": False}}[mode]
    llm, outs = _generate(path, prompts, **engine)
    for out, want, want_lp in zip(outs, hf_tokens, hf_logprobs):
        got = out.outputs[0]
        assert got.token_ids == want
        ours = [pos[t].logprob for pos, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, want_lp)) < LOGPROB_ATOL
        assert math.isclose(got.cumulative_logprob, sum(ours), rel_tol=1e-6, abs_tol=1e-6)
    stats = llm.stats()
    if mode == "preempt":
        assert stats.num_preemptions > 0, "the small pool was meant to force preemption"
    assert llm.engine.kv.num_used_blocks == 0
