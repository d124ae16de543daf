"""The persistent batch: block-table rows follow the step messages (reused after finish, grown,
forked, emptied on preemption), and a step's inputs equal the Python-list construction they
replaced (``AttentionMetadata.from_lists``) on random schedules and on real engine runs."""
from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.attention.interface import AttentionMetadata
from tokenmill.engine.batch import ScheduledSeq
from tokenmill.engine.input_batch import BlockTables, StepInputs
from tokenmill.testing.tiny_models import make_tiny_model


def _list_inputs(items, token_ids, tables: dict, bs: int):
    """The per-token Python construction of a step (what the runner did before the persistent batch)."""
    ids, positions, slots = [], [], []
    for it, toks in zip(items, token_ids):
        pos = range(it.start, it.start + it.num_new)
        ids += toks[it.start:it.start + it.num_new]
        positions += pos
        slots += [tables[it.seq_id][p // bs] * bs + p % bs for p in pos]
    meta = AttentionMetadata.from_lists([it.num_new for it in items], [it.start + it.num_new for it in items],
                                        [tables[it.seq_id] for it in items], slots, bs, "cpu")
    return ids, positions, meta


def _assert_same_inputs(step: StepInputs, bs: int, want) -> None:
    ids, positions, meta = want
    got = step.metadata(bs, "cpu")
    assert step.input_ids.tolist() == ids and step.positions.tolist() == positions
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        a, b = getattr(got, name), getattr(meta, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got.max_query_len, got.max_seq_len, got.query_lens_cpu, got.seq_lens_cpu) == \
        (meta.max_query_len, meta.max_seq_len, meta.query_lens_cpu, meta.seq_lens_cpu)


def test_rows_are_reused_after_finish_and_come_back_empty():
    bt = BlockTables(2, 4)
    bt.add(1)
    bt.update(1, 0, [5, 6, 7])
    row = bt.rows[1]
    bt.remove(1)
    bt.remove(1)  # finished twice (an abort and a stop): ignored
    bt.add(2)
    assert bt.rows[2] == row and bt.blocks(2) == [] and not bt.np[row].any()
    bt.update(2, 0, [9])
    bt.add(2)  # re-sent after a preemption: same row, empty table
    assert bt.rows[2] == row and bt.blocks(2) == [] and not bt.np[row].any()


def test_table_grows_in_rows_and_width():
    bt = BlockTables(1, 2)
    bt.add(1)
    bt.update(1, 0, [3, 4])
    bt.add(2)
    bt.update(2, 0, [1, 2, 3, 4, 5])
    assert bt.np.shape[0] >= 2 and bt.np.shape[1] >= 5
    assert bt.blocks(1) == [3, 4] and bt.blocks(2) == [1, 2, 3, 4, 5]
    assert bt.table.data_ptr() == torch.from_numpy(bt.np).data_ptr()


def test_fork_copies_the_parent_then_diverges():
    bt = BlockTables(4, 4)
    bt.add(1)
    bt.update(1, 0, [5, 6])
    bt.fork(1, 2)
    bt.update(2, 1, [8])  # copy-on-write of the last block
    assert bt.blocks(1) == [5, 6] and bt.blocks(2) == [5, 8]
    bt.update(1, 1, [])  # truncation: the dropped entry goes back to 0
    assert bt.blocks(1) == [5] and bt.np[bt.rows[1], 1] == 0


def test_random_schedules_build_the_list_inputs():
    rng = random.Random(0)
    bs = 4
    bt = BlockTables(2, 2)  # small: rows and width both grow
    ref: dict[int, list[int]] = {}
    tokens: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.25 or not ref:
            next_id += 1
            bt.add(next_id)
            ref[next_id], tokens[next_id] = [], [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
        elif op < 0.35:
            sid = rng.choice(list(ref))
            bt.remove(sid)
            del ref[sid], tokens[sid]
        elif op < 0.45:
            parent = rng.choice(list(ref))
            next_id += 1
            bt.fork(parent, next_id)
            ref[next_id], tokens[next_id] = list(ref[parent]), list(tokens[parent])
        else:
            sid = rng.choice(list(ref))
            need = -(-len(tokens[sid]) // bs)
            frm = rng.randrange(0, len(ref[sid]) + 1)
            new = [rng.randrange(1, 500) for _ in range(max(0, need - frm) + rng.randrange(2))]
            bt.update(sid, frm, new)
            ref[sid][frm:] = new
        assert {sid: bt.blocks(sid) for sid in ref} == ref
        ready = [sid for sid in ref if len(ref[sid]) * bs >= len(tokens[sid])]
        if not ready:
            continue
        items = []
        for sid in rng.sample(ready, rng.randrange(1, len(ready) + 1)):
            decode = rng.random() < 0.5
            start = len(tokens[sid]) - 1 if decode else rng.randrange(len(tokens[sid]))
            items.append(ScheduledSeq(sid, start, 1 if decode else rng.randrange(1, len(tokens[sid]) - start + 1),
                                      True))
        toks = [tokens[it.seq_id] for it in items]
        _assert_same_inputs(StepInputs.build(items, toks, bt, bs), bs, _list_inputs(items, toks, ref, bs))
    assert bt.np.shape[0] > 2 and bt.np.shape[1] > 2
    live = set(bt.rows.values())
    assert not bt.np[[r for r in range(bt.np.shape[0]) if r not in live]].any()  # free rows are all zero


class _Mirror:
    """Replays each step message on plain lists (the runner's old tables) and checks the runner's
    rows and step inputs against them."""

    def __init__(self, runner):
        self.runner, self.tables, self.steps = runner, {}, 0
        self._execute, self._step_inputs = runner.execute, runner._step_inputs
        runner.execute, runner._step_inputs = self.execute, self.step_inputs

    def execute(self, plan):
        for sid in plan.finished:
            self.tables.pop(sid, None)
        for ns in plan.new_seqs:
            self.tables[ns.seq_id] = []
        for item in plan.seqs:
            self.tables[item.seq_id][item.blocks_from:] = item.new_blocks
        result = self._execute(plan)
        for item in plan.seqs:
            for child in item.child_seq_ids:
                self.tables[child] = list(self.tables[item.seq_id])
        bt = self.runner.block_tables
        assert set(bt.rows) == set(self.tables) == set(self.runner._states)
        assert all(bt.blocks(sid) == t for sid, t in self.tables.items())
        return result

    def step_inputs(self, out, states):
        step = self._step_inputs(out, states)
        toks = [st.token_ids for st in states]
        bs = self.runner.block_size
        _assert_same_inputs(step, bs, _list_inputs(out.seqs, toks, self.tables, bs))
        self.steps += 1
        return step


@pytest.mark.parametrize("opts", [
    dict(num_blocks=9, block_size=8, max_num_batched_tokens=8),  # recompute preemption, chunked, prefix hits
    dict(num_blocks=9, block_size=8, max_num_batched_tokens=64, preemption_mode="swap", num_swap_blocks=64),
    dict(num_blocks=64, block_size=4, max_num_seqs=2),  # rows grown for the forks, reused as sequences finish
], ids=["recompute-chunked", "swap", "reuse"])
def test_engine_runs_build_the_list_inputs(opts):
    path = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(4, 500, (20,), generator=gen).tolist()
    prompts = [[1] + shared + torch.randint(4, 500, (n,), generator=gen).tolist() for n in (3, 11, 7, 2)]
    llm = LLM(str(path), dtype="float32", overlap=False, **opts)
    mirror = _Mirror(llm.engine.runner)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, n=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert all(len(c.token_ids) == 16 for o in outs for c in o.outputs)
    assert mirror.steps > 16
    if opts["num_blocks"] == 9:
        assert llm.stats().num_preemptions > 0
    else:
        # the n=2 forks outgrow the max_num_seqs=2 rows; the eight sequences reuse the grown four
        assert llm.engine.runner.block_tables.np.shape[0] == 4
