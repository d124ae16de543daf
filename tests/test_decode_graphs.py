"""Decode graphs: captured once per batch-size bucket, replayed with the runner's static buffers.

No GPU here: the example plugin's platform declares ``graphs`` and records the callable the
runner captures, replaying it over the same buffers (see ``tokenmill_example.platform``), so
the runner's discipline is exercised for real: padded rows reset every step, inputs copied
into the static buffers, outputs read before the next replay. A runner that skipped the
reset gives wrong tokens, which the last test shows.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenmill_example")

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.engine.graphs import DecodeGraphs  # noqa: E402
from tokenmill.testing import hf_greedy, make_tiny_model  # noqa: E402


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(4, 500, (n,), generator=gen).tolist() for n in (4, 17, 9, 30, 12)]


def _run(path, prompts, max_tokens, **opts):
    llm = LLM(str(path), device="example", dtype="float32", max_model_len=128, max_num_seqs=8, **opts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens])
    return llm, [o.outputs[0].token_ids for o in outs]


# request 0 ends first, so the batch shrinks inside a bucket (5 -> 4 of bucket 8, 4 -> 3 of 4...)
MAX_TOKENS = [3, 20, 9, 14, 6]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_replayed_decode_steps_equal_eager_and_hf(arch):
    path = make_tiny_model(arch)
    prompts = _prompts()
    eager, want = _run(path, prompts, MAX_TOKENS, enforce_eager=True)
    assert eager.engine.runner.graphs is None and eager.stats().graph_replays == 0
    llm, got = _run(path, prompts, MAX_TOKENS)
    assert got == want
    hf = hf_greedy(path, prompts, max(MAX_TOKENS))
    assert got == [h[:m] for h, m in zip(hf, MAX_TOKENS)]
    graphs = llm.engine.runner.graphs
    assert llm.stats().graph_replays > 0 and graphs.failed is None
    assert set(graphs.graphs) <= set(graphs.sizes) and len(graphs.graphs) >= 3  # 8, 4, 2, 1 used
    captured = llm.engine.platform.captured
    assert sum(g.replays for g in captured[-len(graphs.graphs):]) == llm.stats().graph_replays


def test_graphs_with_swap_preemption_and_prefix_caching():
    """Swapped-in blocks and prefix-cached blocks are read by replayed steps like any other."""
    path = make_tiny_model("llama")
    prompts = [p + [5, 6] for p in _prompts()[:1]] + _prompts()
    opts = dict(num_blocks=12, block_size=8, preemption_mode="swap", num_swap_blocks=64)
    _, want = _run(path, prompts, [16] * len(prompts), enforce_eager=True, **opts)
    llm, got = _run(path, prompts, [16] * len(prompts), **opts)
    assert got == want
    s = llm.stats()
    assert s.graph_replays > 0 and s.swapped_out_blocks > 0


def test_a_runner_that_keeps_stale_padded_slots_gives_other_tokens(monkeypatch):
    """The recorded replay is strict enough to catch the classic bug: padded rows that still write to
    the slots of the last step (here a live sequence's previous position gets padding's K/V)."""
    path = make_tiny_model("llama")
    prompts = _prompts()
    max_tokens = [3, 6, 20, 14, 9]  # request 1 leaves bucket 4 first: the last row goes stale
    _, want = _run(path, prompts, max_tokens, enforce_eager=True)
    copy_in = DecodeGraphs._copy_in

    def stale(self, size, step):
        n = len(step.input_ids)
        old = self.slots[n:size].clone()
        copy_in(self, size, step)
        self.slots[n:size] = old

    monkeypatch.setattr(DecodeGraphs, "_copy_in", stale)
    llm, got = _run(path, prompts, max_tokens)
    assert llm.stats().graph_replays > 0
    assert got != want
    monkeypatch.setattr(DecodeGraphs, "_copy_in", copy_in)
    assert _run(path, prompts, max_tokens)[1] == want


def test_graphs_off_is_logged_reasoned():
    from tokenmill.engine.graphs import graphs_unavailable

    path = make_tiny_model("llama")
    llm = LLM(str(path), device="example", dtype="float32", max_model_len=64, reference_ops=True)
    # the core's reference attention loops over host lists: it is not capturable
    assert "not graph-capturable" in llm.engine.runner.graphs_off
    assert graphs_unavailable(llm.engine.platform, llm.engine.runner.backend, llm.config, 1) is not None
