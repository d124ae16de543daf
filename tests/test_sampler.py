import math

import pytest
import torch

from tokenmill.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    compute_prompt_logprobs,
    compute_token_logprobs,
    make_generator,
)
from tokenmill.sampling_params import SamplingParams

V = 64
EOS = 1


def row(params, output=(), prompt=(5, 6), generator=None, eos=EOS):
    return SamplingRow(params, list(output), list(prompt), generator, len(output), eos)


def sample(logits, rows, sampler=None):
    batch = SamplingBatch.build(rows, vocab_size=logits.shape[1])
    return (sampler or Sampler()).__call__(logits, batch)


def test_greedy_is_argmax_and_logits_untouched():
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    before = logits.clone()
    out = sample(logits, [row(SamplingParams(temperature=0))] * 8)
    assert out.token_ids() == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)
    assert out.logprobs is None and out.row_logprobs() == [None] * 8


def test_mixed_greedy_and_random_rows():
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    rows = [row(SamplingParams(temperature=0 if i % 2 else 1.0)) for i in range(6)]
    ids = sample(logits, rows, Sampler(torch.Generator().manual_seed(0))).token_ids()
    for i in range(1, 6, 2):
        assert ids[i] == logits[i].argmax().item()


def test_seeded_row_independent_of_batch():
    torch.manual_seed(2)
    steps = 40
    step_logits = [torch.randn(V) * 2 for _ in range(steps)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    g_alone = make_generator(1234)
    alone = []
    for lg in step_logits:
        alone += sample(lg.unsqueeze(0), [row(params, generator=g_alone)]).token_ids()

    g_batch = make_generator(1234)
    other_seeded = make_generator(99)
    shared = Sampler(torch.Generator().manual_seed(7))
    in_batch = []
    for s, lg in enumerate(step_logits):
        others = torch.randn(4, V)
        logits = torch.stack([others[0], others[1], lg, others[2], others[3]])
        rows = [
            row(SamplingParams(temperature=1.3)),
            row(SamplingParams(temperature=0.5, top_k=5, seed=99), generator=other_seeded),
            row(params, generator=g_batch),
            row(SamplingParams(temperature=0)),
            row(SamplingParams(temperature=0.8, min_p=0.1)),
        ][: 3 + s % 3]  # vary the batch size too
        in_batch.append(sample(logits[: len(rows)], rows, shared).token_ids()[2])
    assert alone == in_batch
    # And the seed matters: another seed gives another sequence.
    g_other = make_generator(4321)
    other = [sample(lg.unsqueeze(0), [row(SamplingParams(temperature=0.9, top_p=0.95, seed=4321),
                                         generator=g_other)]).token_ids()[0] for lg in step_logits]
    assert other != alone


def test_seeded_row_needs_generator():
    with pytest.raises(ValueError, match="generator"):
        SamplingBatch.build([row(SamplingParams(seed=3))], vocab_size=V)
    SamplingBatch.build([row(SamplingParams(seed=3, temperature=0))], vocab_size=V)  # greedy: fine


def _many_draws(logits_row, params, n=3000, seed=0):
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return sample(logits, [row(params)] * n, Sampler(torch.Generator().manual_seed(seed))).sampled_token_ids


def test_top_k_stays_in_set():
    torch.manual_seed(3)
    lg = torch.randn(V)
    allowed = set(torch.topk(lg, 5).indices.tolist())
    drawn = set(_many_draws(lg, SamplingParams(temperature=2.0, top_k=5)).tolist())
    assert drawn == allowed  # inside the set, and the set is reachable


@pytest.mark.parametrize("with_top_p", [False, True])
def test_top_k_per_row_in_one_batch(with_top_p):
    torch.manual_seed(6)
    lg = torch.randn(V)
    ks = [2, 0, 7, V + 5]  # 0 and k >= V: off
    reps = 800
    logits = lg.repeat(len(ks) * reps, 1)
    top_p = 0.999999 if with_top_p else 1.0  # forces the sort-based path without changing the sets
    rows = [row(SamplingParams(temperature=3.0, top_k=k, top_p=top_p)) for k in ks] * reps
    drawn = sample(logits, rows, Sampler(torch.Generator().manual_seed(1))).sampled_token_ids.view(reps, len(ks))
    for j, k in enumerate(ks):
        got = set(drawn[:, j].tolist())
        if 0 < k < V:
            assert got == set(torch.topk(lg, k).indices.tolist())
        else:
            assert len(got) > 7


def test_top_p_stays_in_set():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * 0)
    lg = probs.log()
    # Smallest set with mass >= 0.8: {0, 1, 2} (0.85).
    drawn = set(_many_draws(lg, SamplingParams(top_p=0.8)).tolist())
    assert drawn == {0, 1, 2}
    # top_p tiny keeps only the most likely token.
    assert set(_many_draws(lg, SamplingParams(top_p=0.01)).tolist()) == {0}


def test_min_p_stays_in_set():
    probs = torch.tensor([0.5, 0.2, 0.12, 0.1, 0.08])
    # threshold 0.3 * 0.5 = 0.15: keeps {0, 1}
    drawn = set(_many_draws(probs.log(), SamplingParams(min_p=0.3)).tolist())
    assert drawn == {0, 1}


def test_top_k_then_top_p_on_renormalised_probs():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    # top_k=3 -> [0.4, 0.333, 0.267]; top_p=0.7 -> {0, 1} (0.733)
    drawn = set(_many_draws(probs.log(), SamplingParams(top_k=3, top_p=0.7)).tolist())
    assert drawn == {0, 1}


def test_draws_follow_the_distribution():
    lg = torch.tensor([1.0, 0.0, -1.0, 0.5])
    t = 0.7
    expected = torch.softmax(lg / t, -1)
    n = 20000
    drawn = _many_draws(lg, SamplingParams(temperature=t), n=n, seed=5)
    freq = torch.bincount(drawn, minlength=4).float() / n
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_penalties_exact_numbers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [row(p, output=[1, 1, 3], prompt=[0]), row(SamplingParams(), output=[1, 1, 3], prompt=[0])]
    batch = SamplingBatch.build(rows, vocab_size=5)
    assert batch.penalty_rows.tolist() == [0]
    got = apply_penalties(logits[batch.penalty_rows], batch)
    # token 0: prompt, positive -> 2/2; token 1: output x2, negative -> -1*2 - 0.5*2 - 0.25;
    # token 2: unseen; token 3: output x1, positive -> 3/2 - 0.5 - 0.25; token 4: unseen.
    expected = torch.tensor([[1.0, -3.25, 0.5, 0.75, -2.0]])
    assert torch.allclose(got, expected)


def test_presence_frequency_only_over_output_tokens():
    logits = torch.zeros(1, 4)
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)
    batch = SamplingBatch.build([row(p, output=[2, 2, 2], prompt=[0, 1])], vocab_size=4)
    assert batch.prompt_ids is None  # no repetition penalty: the prompt is not even looked at
    assert apply_penalties(logits, batch).tolist() == [[0.0, 0.0, -3.5, 0.0]]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    assert sample(logits, [row(SamplingParams(temperature=0), output=[0])]).token_ids() == [0]
    p = SamplingParams(temperature=0, repetition_penalty=1.2)
    # prompt id 5 is outside these 4 logits: ignored, not an error
    assert sample(logits, [row(p, output=[0], prompt=[2, 5])]).token_ids() == [1]


def test_logit_bias():
    logits = torch.zeros(2, V)
    logits[:, 10] = 5.0
    rows = [row(SamplingParams(temperature=0, logit_bias={"20": 6.0})), row(SamplingParams(temperature=0))]
    assert sample(logits, rows).token_ids() == [20, 10]
    # -100 bans a token even for random sampling.
    p = SamplingParams(logit_bias={10: -100})
    assert 10 not in _many_draws(logits[0], p, n=500).tolist()


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.full((1, V), -5.0)
    logits[0, EOS], logits[0, 7], logits[0, 3] = 10.0, 9.0, 1.0
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    for n_out in range(3):
        ids = sample(logits, [row(p, output=[9] * n_out)]).token_ids()
        assert ids == [3]
    assert sample(logits, [row(p, output=[9] * 3)]).token_ids() == [EOS]
    # random rows too
    drawn = _many_draws(logits[0], SamplingParams(min_tokens=2, stop_token_ids=[7]), n=500)
    assert EOS not in drawn.tolist() and 7 not in drawn.tolist()


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    rows = [
        row(SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5, logit_bias={4: 3.0}), output=[4]),
        row(SamplingParams(temperature=0)),
        row(SamplingParams(temperature=0, logprobs=0)),
    ]
    out = sample(logits, rows, Sampler(torch.Generator().manual_seed(0)))
    ref = torch.log_softmax(logits, -1)
    ids = out.token_ids()
    per_row = out.row_logprobs()
    assert per_row[1] is None
    r0 = per_row[0]
    assert r0.token_id == ids[0]
    assert math.isclose(r0.logprob, ref[0, ids[0]].item(), abs_tol=1e-5)
    assert r0.rank == int((ref[0] > ref[0, ids[0]]).sum()) + 1
    top = torch.topk(ref[0], 3)
    assert [t for t, _ in r0.top] == top.indices.tolist()
    assert torch.allclose(torch.tensor([v for _, v in r0.top]), top.values, atol=1e-5)
    r2 = per_row[2]
    assert r2.top == [] and r2.rank == 1 and math.isclose(r2.logprob, ref[2].max().item(), abs_tol=1e-5)


def test_prompt_logprobs():
    torch.manual_seed(5)
    prompt = [3, 9, 4, 4, 17]
    logits = torch.randn(len(prompt), V)
    got = compute_prompt_logprobs(logits, prompt, num_top=2)
    ref = torch.log_softmax(logits, -1)
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        e = got[i]
        assert e.token_id == prompt[i]
        assert math.isclose(e.logprob, ref[i - 1, prompt[i]].item(), abs_tol=1e-5)
        assert [t for t, _ in e.top] == torch.topk(ref[i - 1], 2).indices.tolist()
        assert e.rank == int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
    with pytest.raises(ValueError):
        compute_prompt_logprobs(logits[:3], prompt, 1)
    # the chunked building block agrees
    lp = compute_token_logprobs(logits[1:3], prompt[2:4], 0)
    assert torch.allclose(lp.logprobs, torch.tensor([got[2].logprob, got[3].logprob]))


def test_greedy_batch_builds_no_random_state():
    batch = SamplingBatch.build([row(SamplingParams(temperature=0))] * 3, vocab_size=V)
    assert batch.all_greedy and batch.temperature is None and batch.top_k is None
    assert batch.penalty_rows is None and batch.bias_index is None and batch.max_num_logprobs is None
