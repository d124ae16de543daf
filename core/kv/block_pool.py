"""The physical block pool: block ids, a free list and per-block reference counts.

Pure bookkeeping on integers; the tensors that back the blocks live in the model runner.
A block is in exactly one of three states, and the pool tracks the first two:

- free: on the free list, reference count 0, holds nothing anyone will read;
- referenced: reference count > 0, in the block table of at least one live sequence;
- cached: reference count 0 but kept by the prefix tree (see :mod:`tokenmill.kv.radix`).
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    """``num_blocks`` block ids ``0 .. num_blocks - 1`` with a FIFO free list and reference counts.

    The pool never decides what a reference-0 block becomes: :meth:`decref` reports the
    new count, and the caller either :meth:`release` s the block or hands it to the tree.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._is_free = [True] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks on the free list (not counting cached blocks the tree could give up)."""
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        """Number of sequence block tables holding ``block_id``."""
        return self._ref[block_id]

    def is_free(self, block_id: int) -> bool:
        """Whether ``block_id`` is on the free list."""
        return self._is_free[block_id]

    def take(self) -> int:
        """Pop the oldest free block and give it reference count 1. Raises if none is free."""
        if not self._free:
            raise RuntimeError("block pool exhausted: no free block")
        block_id = self._free.popleft()
        self._is_free[block_id] = False
        self._ref[block_id] = 1
        return block_id

    def claim(self, block_id: int) -> None:
        """Give a non-free, unreferenced block (one just evicted from the tree) reference count 1."""
        assert not self._is_free[block_id] and self._ref[block_id] == 0, block_id
        self._ref[block_id] = 1

    def incref(self, block_id: int) -> None:
        """One more table holds ``block_id`` (which must not be on the free list)."""
        assert not self._is_free[block_id], f"incref of free block {block_id}"
        self._ref[block_id] += 1

    def decref(self, block_id: int) -> int:
        """One table fewer holds ``block_id``; returns the new reference count."""
        assert self._ref[block_id] > 0, f"decref of unreferenced block {block_id}"
        self._ref[block_id] -= 1
        return self._ref[block_id]

    def release(self, block_id: int) -> None:
        """Return an unreferenced block to the end of the free list."""
        assert self._ref[block_id] == 0, f"release of referenced block {block_id}"
        assert not self._is_free[block_id], f"double release of block {block_id}"
        self._is_free[block_id] = True
        self._free.append(block_id)

    def free_block_ids(self) -> list[int]:
        """The free list, oldest first (for invariant checks and debugging)."""
        return list(self._free)

    def check_invariants(self) -> None:
        """Raise AssertionError if the free list and the flags/counts disagree."""
        free = list(self._free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        free_set = set(free)
        for b in range(self.num_blocks):
            assert self._ref[b] >= 0, f"block {b} has negative ref count"
            assert self._is_free[b] == (b in free_set), f"block {b}: free flag disagrees with free list"
            if self._is_free[b]:
                assert self._ref[b] == 0, f"free block {b} has ref count {self._ref[b]}"
