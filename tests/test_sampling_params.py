import pytest

from tokenmill.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop_strings == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None and p.logit_bias is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": "x", "detokenize": False}, "stop"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_boundaries_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=2, frequency_penalty=-2, repetition_penalty=1.5)
    assert SamplingParams(max_tokens=0).max_tokens == 0  # scoring a prompt only
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


def test_greedy_and_sampling_type():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.7, seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.7).sampling_type is SamplingType.RANDOM


def test_stop_normalisation_and_buffer():
    p = SamplingParams(stop="END")
    assert p.stop_strings == ["END"] and p.output_text_buffer_length == 2
    p = SamplingParams(stop=["a", "abcd"], stop_token_ids=(7, 8))
    assert p.output_text_buffer_length == 3 and p.stop_token_ids == [7, 8]
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_logit_bias_string_keys_and_clamp():
    p = SamplingParams(logit_bias={"5": 3, 7: -250.0, "9": 101})
    assert p.logit_bias == {5: 3.0, 7: -100.0, 9: 100.0}


def test_verify_vocab():
    SamplingParams(logit_bias={3: 1.0}, stop_token_ids=[9]).verify_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).verify_vocab(10)


def test_all_stop_token_ids():
    p = SamplingParams(stop_token_ids=[4])
    assert p.all_stop_token_ids(2) == {2, 4}
    assert p.all_stop_token_ids([2, 3]) == {2, 3, 4}
    assert SamplingParams(stop_token_ids=[4], ignore_eos=True).all_stop_token_ids(2) == {4}


def test_for_child_seeds():
    p = SamplingParams(n=3, seed=10, temperature=0.5)
    kids = [p.for_child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12] and all(k.n == 1 for k in kids)
    assert p.n == 3 and p.seed == 10
    assert SamplingParams(n=2).for_child(1).seed is None
