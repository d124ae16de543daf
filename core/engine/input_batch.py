"""The persistent batch: every held sequence's block table lives in one host tensor, and each
step's inputs are built from it with array ops.

A sequence gets a row of the int32 host table when the runner first holds it and gives it
back when it finishes. The scheduler's changes (``table[blocks_from:] = new_blocks``) are
written into that row only, so a decode step that allocates nothing touches no table. A
step gathers its sequences' rows and computes positions and slots for all its tokens at
once, instead of padding Python lists per token and per table. Entries past a row's own
blocks are kept 0, so a gathered table equals the Python lists padded with block 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.interface import AttentionMetadata


class BlockTables:
    """Host block tables of the sequences the runner holds: row ``rows[seq_id]``, of which the
    first ``num_blocks[row]`` entries are valid. Grows (rows or width) when a step needs more."""

    def __init__(self, num_rows: int, width: int):
        self.table = torch.zeros(num_rows, width, dtype=torch.int32)
        self.np = self.table.numpy()  # the same memory, for numpy indexing
        self.num_blocks = [0] * num_rows  # a list: the runner compares against it per sequence per step
        self.rows: dict[int, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))

    def add(self, seq_id: int) -> None:
        """Hold ``seq_id`` with an empty table (a re-sent sequence keeps its row, emptied)."""
        row = self.rows.get(seq_id)
        if row is None:
            if not self._free:
                self._grow(2 * len(self.num_blocks), self.np.shape[1])
            row = self.rows[seq_id] = self._free.pop()
        self.np[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0

    def remove(self, seq_id: int) -> None:
        """Free the row of a finished sequence (unknown ids are ignored, as the runner's states)."""
        row = self.rows.pop(seq_id, None)
        if row is not None:
            self.np[row, :self.num_blocks[row]] = 0
            self.num_blocks[row] = 0
            self._free.append(row)

    def update(self, seq_id: int, start: int, blocks: list[int]) -> None:
        """``table[start:] = blocks`` for ``seq_id``."""
        row = self.rows[seq_id]
        old, end = self.num_blocks[row], start + len(blocks)
        if end > self.np.shape[1]:
            self._grow(len(self.num_blocks), max(end, 2 * self.np.shape[1]))
        self.np[row, start:end] = blocks
        if end < old:
            self.np[row, end:old] = 0
        self.num_blocks[row] = end

    def fork(self, parent_id: int, child_id: int) -> None:
        """Hold ``child_id`` with a copy of ``parent_id``'s table (n > 1: the child starts as the parent)."""
        self.add(child_id)
        src, dst = self.rows[parent_id], self.rows[child_id]
        n = self.num_blocks[src]
        self.np[dst, :n] = self.np[src, :n]
        self.num_blocks[dst] = n

    def blocks(self, seq_id: int) -> list[int]:
        """The table of ``seq_id`` as a list."""
        row = self.rows[seq_id]
        return self.np[row, :self.num_blocks[row]].tolist()

    def _grow(self, num_rows: int, width: int) -> None:
        rows, cols = self.np.shape
        table = torch.zeros(num_rows, width, dtype=torch.int32)
        table[:rows, :cols] = self.table
        self.table, self.np = table, table.numpy()
        self.num_blocks += [0] * (num_rows - rows)
        self._free[:0] = range(num_rows - 1, rows - 1, -1)


@dataclass
class StepInputs:
    """One step's inputs on the host, in the layout of :mod:`tokenmill.attention.interface`:
    per token ``input_ids``, ``positions``, ``slots`` (int64 ``[T]``); per sequence
    ``query_lens``, ``seq_lens`` (int64 ``[S]``) and ``block_tables`` (int32 ``[S, W]``,
    ``W`` the longest table of the step)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    query_lens: np.ndarray
    seq_lens: np.ndarray
    block_tables: torch.Tensor

    @classmethod
    def build(cls, items, token_ids: list[list[int]], tables: BlockTables, block_size: int) -> "StepInputs":
        """The inputs of scheduled ``items`` whose sequences hold ``token_ids`` (in the same order)."""
        n = len(items)
        row_list = [tables.rows[it.seq_id] for it in items]
        rows = np.array(row_list, dtype=np.int64)
        starts = np.fromiter((it.start for it in items), np.int64, n)
        query_lens = np.fromiter((it.num_new for it in items), np.int64, n)
        if (query_lens == 1).all():  # decode
            positions, token_rows = starts, rows
            input_ids = np.fromiter((t[s] for t, s in zip(token_ids, starts.tolist())), np.int64, n)
        else:
            num_tokens = int(query_lens.sum())
            first_row = np.cumsum(query_lens) - query_lens
            positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - first_row, query_lens)
            token_rows = np.repeat(rows, query_lens)
            ids: list[int] = []
            for it, t in zip(items, token_ids):
                ids.extend(t[it.start:it.start + it.num_new])
            input_ids = np.array(ids, dtype=np.int64)
        block, offset = np.divmod(positions, block_size)
        slots = tables.np[token_rows, block] * np.int64(block_size) + offset  # int64: no int32 overflow
        width = max(map(tables.num_blocks.__getitem__, row_list))
        block_tables = torch.from_numpy(tables.np[rows, :width])
        return cls(input_ids, positions, slots, query_lens, starts + query_lens, block_tables)

    def metadata(self, block_size: int, device) -> AttentionMetadata:
        """The step's :class:`AttentionMetadata` on ``device`` (the same values ``from_lists`` gives)."""
        query_start_loc = np.zeros(len(self.query_lens) + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=query_start_loc[1:])
        query_lens, seq_lens = self.query_lens.tolist(), self.seq_lens.tolist()
        return AttentionMetadata(
            query_start_loc=torch.from_numpy(query_start_loc).to(device),
            seq_lens=torch.from_numpy(self.seq_lens.astype(np.int32)).to(device),
            block_tables=self.block_tables.to(device), slot_mapping=torch.from_numpy(self.slots).to(device),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=block_size)
