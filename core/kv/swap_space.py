"""Host slots for the KV blocks of swapped-out sequences: ids and counts, never tensors.

With ``preemption_mode="swap"`` the scheduler preempts a sequence by copying the blocks
that hold its computed positions to a bounded host swap space and freeing them on the
device; when it resumes, it gets fresh device blocks and the copies go back. This module
decides the block pairs; the model runner performs the copies (every tensor-parallel rank
its own shard), in the order the step message documents
(:class:`tokenmill.engine.batch.SchedulerOutput`).

A swapped-out sequence holds host slots and no device block. Its slots return to the
free list when it is swapped in, or when it finishes or is aborted while swapped out
(:meth:`SwapSpace.discard`), so nothing leaks.
"""
from __future__ import annotations

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager


class SwapSpace:
    """``num_slots`` host slots of one KV block each, handed to swapped-out sequences."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self.block_size = block_size
        self._pool = BlockPool(num_slots) if num_slots else None
        self._held: dict[int, list[int]] = {}
        #: Blocks copied out and back in since start, and preemptions that found the space full.
        self.blocks_out = 0
        self.blocks_in = 0
        self.num_full = 0

    @property
    def num_free(self) -> int:
        """Slots free right now."""
        return self._pool.num_free if self._pool is not None else 0

    def holds(self, seq_id: int) -> bool:
        """Whether ``seq_id`` is swapped out (its KV sits in host slots)."""
        return seq_id in self._held

    def __len__(self) -> int:
        """Swapped-out sequences."""
        return len(self._held)

    def swap_out(self, kv: KVCacheManager, seq_id: int, num_computed: int) -> list[tuple[int, int]] | None:
        """Move the blocks of ``seq_id``'s first ``num_computed`` positions to host slots.

        Returns the ``(device_block, host_slot)`` pairs to copy and frees the sequence's
        device blocks (shared and cached ones stay with their other holders); the runner
        copies before anything else in the step, so the freed blocks can be reused in the
        same step. Returns None and changes nothing when there is nothing to keep
        (``num_computed`` 0) or not enough free slots: the caller recomputes instead.
        """
        if seq_id in self._held:
            raise ValueError(f"swap_out: sequence {seq_id} is already swapped out")
        n = -(-num_computed // self.block_size)
        table = kv.block_table(seq_id)
        if n == 0:
            return None
        if n > len(table):
            raise ValueError(f"swap_out: sequence {seq_id} has {num_computed} computed positions but "
                             f"only {len(table)} blocks")
        if n > self.num_free:
            self.num_full += 1
            return None
        slots = [self._pool.take() for _ in range(n)]
        self._held[seq_id] = slots
        kv.free(seq_id)
        self.blocks_out += n
        return list(zip(table[:n], slots))

    def swap_in_cost(self, kv: KVCacheManager, seq_id: int, num_tokens: int) -> int:
        """Device blocks :meth:`swap_in` plus allocating positions up to ``num_tokens`` would take."""
        return kv.blocks_needed(seq_id, 0, num_tokens)

    def swap_in(self, kv: KVCacheManager, seq_id: int, num_computed: int) -> list[tuple[int, int]] | None:
        """Give ``seq_id`` fresh device blocks for its ``num_computed`` positions and free its slots.

        Returns the ``(host_slot, device_block)`` pairs to copy (before the step's forward),
        or None and changes nothing when the device pool lacks the blocks.
        """
        slots = self._held.get(seq_id)
        if slots is None:
            raise KeyError(f"swap_in: sequence {seq_id} is not swapped out")
        if -(-num_computed // self.block_size) != len(slots):
            raise ValueError(f"swap_in: sequence {seq_id} holds {len(slots)} slots, not the blocks of "
                             f"{num_computed} positions")
        copies = kv.allocate(seq_id, 0, num_computed)
        if copies is None:
            return None
        assert not copies, "a swapped-out sequence holds no device block to copy on write"
        del self._held[seq_id]
        for slot in slots:
            self._pool.decref(slot)
            self._pool.release(slot)
        self.blocks_in += len(slots)
        return list(zip(slots, kv.block_table(seq_id)))

    def discard(self, seq_id: int) -> None:
        """Free the slots of ``seq_id`` (finished or aborted while swapped out); unknown ids are a no-op."""
        for slot in self._held.pop(seq_id, ()):
            self._pool.decref(slot)
            self._pool.release(slot)

    def check_invariants(self) -> None:
        """Raise AssertionError if slots are lost or held twice (tests call this after every step)."""
        held = [s for slots in self._held.values() for s in slots]
        assert len(held) == len(set(held)), "a host slot is held by two sequences"
        if self._pool is None:
            assert not held
            return
        self._pool.check_invariants()
        assert self._pool.num_free + len(held) == self.num_slots, (
            f"host slots leaked: {self._pool.num_free} free + {len(held)} held != {self.num_slots}")
        for s in held:
            assert self._pool.ref_count(s) == 1, f"held slot {s} has ref count {self._pool.ref_count(s)}"
