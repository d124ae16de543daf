"""Pooling (embedding) requests through the engine: the pooled final-norm hidden states equal HF
transformers' on the same weights, across chunked prefill and next to generating requests, and
leave no KV blocks behind (neither held nor cached)."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import make_tiny_model

PROMPTS = ["def main():\n    return 1", "The quick brown fox jumps over the lazy dog " * 3, "x"]


@pytest.fixture(scope="module")
def model_dir():
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def hf_states(model_dir):
    """Per prompt: (token ids, HF's final hidden states [T, hidden])."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok.encode(p)
            out.append((ids, model(torch.tensor([ids])).last_hidden_state[0]))
    return out


@pytest.fixture(scope="module")
def llm(model_dir):
    # A token budget of 16 chunks the longer prompts over several steps.
    return LLM(model_dir, device="cpu", kv_cache_memory=4 << 20, max_model_len=256, max_num_batched_tokens=16)


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_equals_hf(llm, hf_states, pooling):
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in hf_states],
                        SamplingParams(max_tokens=0, pooling=pooling))
    for out, (ids, states) in zip(outs, hf_states):
        assert out.finished and out.outputs[0].token_ids == []
        _close(out.pooled, states[-1] if pooling == "last" else states.mean(0))
    kv = llm.engine.kv
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 0  # nothing held, nothing cached


def test_pooling_next_to_generation(llm, hf_states):
    gen = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    (alone,) = llm.generate(["def main():"], gen)
    outs = llm.generate(["def main():", {"prompt_token_ids": hf_states[1][0]}, "def main():"],
                        [gen, SamplingParams(max_tokens=0, pooling="mean"), gen])
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids == alone.outputs[0].token_ids
    assert outs[0].pooled is None
    _close(outs[1].pooled, hf_states[1][1].mean(0))
    # a prompt a pooling request computed is not served from the prefix cache afterwards
    (again,) = llm.generate([{"prompt_token_ids": hf_states[1][0]}], SamplingParams(max_tokens=1, temperature=0.0))
    assert again.num_cached_tokens == 0


@pytest.mark.parametrize("kw,msg", [({"pooling": "cls", "max_tokens": 0}, "pooling"),
                                    ({"pooling": "mean"}, "max_tokens=0"),
                                    ({"pooling": "last", "max_tokens": 0, "n": 2}, "n=1")])
def test_pooling_params_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
