"""The offline API end to end on a tiny model: sampling features, n > 1, stops, bad input."""
from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.testing.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm():
    return LLM(model=str(make_tiny_model("llama")), dtype="float32")


PROMPTS = ["def main(", "The quick brown fox", "import os\n"]


def test_outputs_shaped_like_vllm(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    assert [o.prompt for o in outs] == PROMPTS
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.index == 0 and len(c.token_ids) <= 8
        assert c.finish_reason in ("stop", "length")
        assert c.text == llm.get_tokenizer().decode(c.token_ids, skip_special_tokens=True)


def test_seed_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(["def main("], p)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS + ["def main("], [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 3 + [p])
    assert batch[3].outputs[0].token_ids == alone
    other = llm.generate(["def main("], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_n_greater_than_one(llm):
    out = llm.generate(["def main("], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(["def main("], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate(["def main("], SamplingParams(n=2, max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert llm.engine.kv.num_used_blocks == 0


def test_stop_strings(llm):
    base = llm.generate(["import os\n"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    stop = base.text[5:8]
    assert stop and stop in base.text
    cut = llm.generate(["import os\n"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    c = cut.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == base.text[: base.text.index(stop)]
    kept = llm.generate(["import os\n"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                                         include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]
    assert llm.engine.kv.num_used_blocks == 0


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(["def main("], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    tok = base.token_ids[3]
    first = base.token_ids.index(tok)
    out = llm.generate(["def main("], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                      stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == tok


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate(["def main("], SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2))[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    for pos, t in zip(c.logprobs, c.token_ids):
        assert t in pos and pos[t].rank == 1 and len(pos) in (3, 4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, len(out.prompt_token_ids)))


def test_prompt_logprobs_survive_chunked_prefill():
    path = str(make_tiny_model("llama"))
    prompt = "import os\nimport sys\nimport json\n"
    a = LLM(model=path, dtype="float32").generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    b = LLM(model=path, dtype="float32", max_num_batched_tokens=5).generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    la = [None if p is None else p[t].logprob for p, t in zip(a.prompt_logprobs, a.prompt_token_ids)]
    lb = [None if p is None else p[t].logprob for p, t in zip(b.prompt_logprobs, b.prompt_token_ids)]
    assert la[0] is None and lb[0] is None
    assert all(abs(x - y) < 1e-4 for x, y in zip(la[1:], lb[1:]))


def test_max_tokens_zero_scores_the_prompt(llm):
    out = llm.generate([[1, 50, 60, 70]], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == 4


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=5, temperature=0))[0]
    assert "<|assistant|>" in out.prompt and len(out.outputs[0].token_ids) <= 5


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context():
    llm = LLM(model=str(make_tiny_model("llama")), max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(5, 30))], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 5, 6]], SamplingParams(max_tokens=2))[0].finished


def test_unknown_architecture(tmp_path):
    import json
    import shutil

    src = make_tiny_model("llama")
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["TotallyNewForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(model=str(dst))


def test_bad_engine_options():
    with pytest.raises(ValueError, match="block_size"):
        LLM(model=str(make_tiny_model("llama")), block_size=0)
    with pytest.raises(ValueError, match="not a local directory"):
        LLM(model="/nonexistent/model")


def test_reference_ops_path_matches_the_plugin_path(llm):
    ref = LLM(model=str(make_tiny_model("llama")), dtype="float32", reference_ops=True)
    assert set(ref.engine.runner.kernels.providers.values()) == {"reference"}
    assert ref.engine.runner.backend.name == "reference"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in ref.generate(PROMPTS, params)] == \
        [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def test_request_larger_than_the_whole_kv_cache_is_refused():
    llm = LLM(model=str(make_tiny_model("llama")), num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=40))
    assert llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True))[0].outputs[0].finish_reason == "length"


def test_abort_all_frees_every_block(llm):
    eng = llm.engine
    for i in range(3):
        eng.add_request(f"all-{i}", [1, 5, 6, 7, 8] * 8, SamplingParams(max_tokens=30, n=2, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.num_used_blocks > 0
    assert sorted(eng.abort_all()) == ["all-0", "all-1", "all-2"]
    assert eng.kv.num_used_blocks == 0 and not eng.has_unfinished()
    eng.kv.check_invariants()
