"""KVCacheManager: block tables, automatic prefix caching and copy-on-write, on ids and counts only.

The scheduler calls, per sequence: :meth:`KVCacheManager.match_prefix` once when it first
schedules it, :meth:`~KVCacheManager.allocate` before every step (running the returned
copies before the step's forward), :meth:`~KVCacheManager.cache_blocks` after every step, and
:meth:`~KVCacheManager.free` when it finishes or is preempted. Nothing here touches a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.radix import RadixNode, RadixTree


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters since start (or the last :meth:`reset`)."""

    queries_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache (0.0 before any query)."""
        return self.hit_tokens / self.queries_tokens if self.queries_tokens else 0.0

    def reset(self) -> None:
        self.queries_tokens = self.hit_tokens = self.evicted_blocks = 0


@dataclass
class _SeqCacheState:
    # How far this sequence's own table is mirrored in the tree; last_node None means the root.
    salt: Hashable
    num_cached: int = 0
    last_node: RadixNode | None = None
    # A block of this table is cached at another place in the tree: its later blocks stay private.
    diverged: bool = False


class KVCacheManager:
    """Hands out KV blocks to sequences and shares full blocks between them through a radix tree.

    Every block is exactly one of: free, referenced by at least one live sequence, or cached
    (unreferenced, held only by the tree, evictable LRU leaves-first). ``num_free_blocks``
    counts free plus cached blocks, since allocation evicts cached ones on demand.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._pool = BlockPool(num_blocks)
        self._tree = RadixTree(self._pool, block_size)
        self._tables: dict[int, list[int]] = {}
        self._cache_state: dict[int, _SeqCacheState] = {}

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable right now: free ones plus evictable cached ones."""
        return self._pool.num_free + self._tree.num_unreferenced

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - self._pool.num_free - self._tree.num_unreferenced

    @property
    def num_cached_blocks(self) -> int:
        """Blocks held only by the prefix tree (reference count 0, evictable)."""
        return self._tree.num_unreferenced

    @property
    def usage(self) -> float:
        """Fraction of all blocks referenced by live sequences."""
        return self.num_used_blocks / self.num_blocks

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of ``seq_id``'s block table (empty for an unknown sequence)."""
        return list(self._tables.get(seq_id, ()))

    def num_blocks_of(self, seq_id: int) -> int:
        """Length of ``seq_id``'s block table."""
        return len(self._tables.get(seq_id, ()))

    def ref_count(self, block_id: int) -> int:
        """How many live block tables hold ``block_id``."""
        return self._pool.ref_count(block_id)

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is a node of the prefix tree (and so must never be written)."""
        return self._tree.node_of(block_id) is not None

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    # ---- prefix caching -----------------------------------------------------------------------
    def _match(self, token_ids: Sequence[int], salt: str | None) -> tuple[list[RadixNode], int]:
        # (matched nodes, tokens reused): a prompt cached whole reuses all but its last token,
        # which is computed again (its block copied on write) for the logits to sample from.
        path = self._tree.match(salt, token_ids, len(token_ids) // self.block_size)
        return path, min(len(path) * self.block_size, len(token_ids) - 1)

    def match_prefix(self, seq_id: int, token_ids: Sequence[int], salt: str | None = None) -> int:
        """Attach the longest cached run of full blocks prefixing ``token_ids``; return the tokens reused.

        Call once when the sequence is first scheduled (it must hold no blocks). At least one
        token is always computed: when every block of the prompt is cached, all but the last
        token are reused, and :meth:`allocate` copies the last block on write before it is
        written. Otherwise a multiple of ``block_size``; 0 with prefix caching off (and then
        no stats are counted).
        """
        if self._tables.get(seq_id):
            raise ValueError(f"match_prefix: sequence {seq_id} already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        path, hit = self._match(token_ids, salt)
        tick = self._tree.tick()
        for node in path:
            if self._pool.ref_count(node.block_id) == 0:
                self._tree.on_referenced(node)
            self._pool.incref(node.block_id)
            node.last_access = tick
        self._tables[seq_id] = [node.block_id for node in path]
        self._cache_state[seq_id] = _SeqCacheState(salt, len(path), path[-1] if path else None)
        self.stats.queries_tokens += len(token_ids)
        self.stats.hit_tokens += hit
        return hit

    def peek_prefix(self, token_ids: Sequence[int], salt: str | None = None) -> int:
        """How many tokens :meth:`match_prefix` would reuse now; changes nothing, counts no stats."""
        if not self.enable_prefix_caching:
            return 0
        return self._match(token_ids, salt)[1]

    def admission_cost(self, token_ids: Sequence[int], salt: str | None, num_tokens: int,
                       use_prefix: bool = True) -> tuple[int, int]:
        """What admitting a sequence would take, changing nothing: ``(hit, blocks)``.

        ``hit`` is the tokens :meth:`match_prefix` would reuse now (0 if ``use_prefix`` is false);
        ``blocks`` how many of :attr:`num_free_blocks` matching and then allocating positions up to
        ``num_tokens`` would use up: the new blocks, the copy of the last block when the whole
        prompt is cached, plus the matched cached blocks that no live sequence holds yet
        (matching pins them, so they stop being evictable). Admit only when
        ``blocks <= num_free_blocks``; then ``match_prefix`` and ``allocate`` both succeed.
        """
        path, hit = [], 0
        if use_prefix and self.enable_prefix_caching:
            path, hit = self._match(token_ids, salt)
        pinned = sum(1 for node in path if self._pool.ref_count(node.block_id) == 0)
        new = max(0, -(-max(num_tokens, hit) // self.block_size) - len(path))
        copy = 1 if hit < len(path) * self.block_size and num_tokens > hit else 0
        return hit, pinned + new + copy

    def cache_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int, salt: str | None = None) -> None:
        """Insert every full, computed block of ``seq_id`` (block i holds ``token_ids[i*bs:(i+1)*bs]``) into the tree.

        Call after each step, chunked prefills included. A block whose content is already
        cached under the same parent (computed concurrently by another sequence, or copied on
        write from the tree) is swapped in this table for the cached block, and the duplicate
        freed: the scheduler sends the changed table with the sequence's next step. No-op with
        caching off or for an unknown (already freed) sequence.
        """
        table = self._tables.get(seq_id)
        if not self.enable_prefix_caching or table is None:
            return
        state = self._cache_state.get(seq_id)
        if state is None:
            state = self._cache_state[seq_id] = _SeqCacheState(salt)
        num_full = min(num_computed // self.block_size, len(token_ids) // self.block_size, len(table))
        if state.diverged or state.num_cached >= num_full:
            return
        bs = self.block_size
        node = state.last_node if state.last_node is not None else self._tree.root(state.salt)
        tick = self._tree.tick()
        for i in range(state.num_cached, num_full):
            key = tuple(token_ids[i * bs:(i + 1) * bs])
            block_id = table[i]
            child = node.children.get(key)
            if child is None:
                if self._tree.node_of(block_id) is not None:  # cached elsewhere: content mismatch
                    state.diverged = True
                    break
                child = self._tree.insert(node, key, block_id, tick)
            else:
                self._tree.touch(child, tick)
                if child.block_id != block_id:
                    # Identical content cached first (by another sequence, or this one's own
                    # copy-on-write of a prompt cached whole): a full, computed block is never
                    # written again, so hold the cached one and drop the duplicate, and the
                    # blocks after it can still be cached.
                    if self._pool.ref_count(child.block_id) == 0:
                        self._tree.on_referenced(child)
                    self._pool.incref(child.block_id)
                    table[i] = child.block_id
                    self._decref(block_id, tick)
            node = child
            state.num_cached, state.last_node = i + 1, child

    def reset_prefix_cache(self) -> None:
        """Drop every cached, unreferenced block back to the free list (referenced ones stay)."""
        while (block_id := self._tree.evict_lru()) is not None:
            self._pool.release(block_id)

    # ---- allocation ---------------------------------------------------------------------------
    def _plan(self, seq_id: int, num_computed: int, num_new: int) -> tuple[int, list[int]]:
        # (new blocks to append, table indices needing a copy-on-write)
        if num_computed < 0 or num_new < 0:
            raise ValueError(f"negative token counts: num_computed={num_computed}, num_new={num_new}")
        table = self._tables.get(seq_id, ())
        bs = self.block_size
        total = num_computed + num_new
        num_append = max(0, -(-total // bs) - len(table))
        cow: list[int] = []
        if num_new:
            for i in range(num_computed // bs, min((total - 1) // bs + 1, len(table))):
                b = table[i]
                if self._pool.ref_count(b) > 1 or self._tree.node_of(b) is not None:
                    cow.append(i)
        return num_append, cow

    def blocks_needed(self, seq_id: int, num_computed: int, num_new: int) -> int:
        """How many blocks :meth:`allocate` would take (new ones plus copy-on-write copies); changes nothing."""
        num_append, cow = self._plan(seq_id, num_computed, num_new)
        return num_append + len(cow)

    def allocate(self, seq_id: int, num_computed: int, num_new: int) -> list[tuple[int, int]] | None:
        """Make ``seq_id``'s table cover positions ``[0, num_computed + num_new)``, ready to write the new ones.

        A block in the written range that is shared (or cached in the tree) is replaced in this
        table by a fresh block; the ``(src, dst)`` pairs are returned and the runner must copy
        them before the step's forward. Free blocks go first, then cached ones are evicted LRU,
        leaves first. Returns None and changes nothing if there are not enough blocks.
        """
        num_append, cow = self._plan(seq_id, num_computed, num_new)
        if num_append + len(cow) > self.num_free_blocks:
            return None
        table = self._tables.setdefault(seq_id, [])
        fresh = [self._take_block() for _ in range(num_append + len(cow))]
        copies: list[tuple[int, int]] = []
        for i, dst in zip(cow, fresh):
            copies.append((table[i], dst))
            table[i] = dst
        table.extend(fresh[len(cow):])
        # Sources are dropped only after all takes, so none is evicted and reused in this call.
        tick = self._tree.tick()
        for src, _ in copies:
            self._decref(src, tick)
        if cow:
            state = self._cache_state.get(seq_id)
            if state is not None and state.num_cached > cow[0]:
                # The caller rewrote already-cached positions: the tree now mirrors less of this table.
                state.num_cached = cow[0]
                state.last_node = self._tree.node_of(table[cow[0] - 1]) if cow[0] else None
        return copies

    def _take_block(self) -> int:
        if self._pool.num_free:
            return self._pool.take()
        block_id = self._tree.evict_lru()
        assert block_id is not None, "num_free_blocks promised a block that cannot be evicted"
        self.stats.evicted_blocks += 1
        self._pool.claim(block_id)
        return block_id

    def _decref(self, block_id: int, tick: int) -> None:
        node = self._tree.node_of(block_id)
        if self._pool.decref(block_id) == 0:
            if node is None:
                self._pool.release(block_id)
            else:
                self._tree.on_unreferenced(node, tick)
        elif node is not None:
            node.last_access = tick

    # ---- lifetime -----------------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        """Release all of ``seq_id``'s blocks. Cached ones stay in the tree; an unknown ``seq_id`` is a no-op."""
        table = self._tables.pop(seq_id, None)
        self._cache_state.pop(seq_id, None)
        if table is None:
            return
        tick = self._tree.tick()
        for block_id in reversed(table):
            self._decref(block_id, tick)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Give ``child_id`` the same block table as ``parent_id`` (every block ref+1); later writes copy on write."""
        if parent_id not in self._tables:
            raise KeyError(f"fork: unknown parent sequence {parent_id}")
        if self._tables.get(child_id):
            raise ValueError(f"fork: child sequence {child_id} already holds blocks")
        table = self._tables[parent_id]
        for block_id in table:
            self._pool.incref(block_id)
        self._tables[child_id] = list(table)
        state = self._cache_state.get(parent_id)
        if state is not None:
            self._cache_state[child_id] = _SeqCacheState(state.salt, state.num_cached, state.last_node, state.diverged)

    # ---- checking -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is off anywhere (tests call this after every step)."""
        self._pool.check_invariants()
        self._tree.check_invariants()
        holders = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            assert len(table) == len(set(table)), f"sequence {seq_id} holds a block twice"
            for b in table:
                holders[b] += 1
        free = cached = used = 0
        for b in range(self.num_blocks):
            assert self._pool.ref_count(b) == holders[b], (
                f"block {b}: ref count {self._pool.ref_count(b)} but {holders[b]} tables hold it")
            in_tree = self._tree.node_of(b) is not None
            is_free = self._pool.is_free(b)
            assert not (is_free and in_tree), f"block {b} is both free and cached"
            if is_free:
                free += 1
            elif holders[b]:
                used += 1
            else:
                assert in_tree, f"block {b} leaked: unreferenced, not free, not cached"
                cached += 1
        assert free + used + cached == self.num_blocks
        assert (free, used, cached) == (self._pool.num_free, self.num_used_blocks, self.num_cached_blocks)
        if not self.enable_prefix_caching:
            assert len(self._tree) == 0, "prefix caching is off but the tree holds blocks"
        for seq_id, state in self._cache_state.items():
            table = self._tables.get(seq_id, [])
            assert state.num_cached <= len(table)
            if state.num_cached:
                assert state.last_node is not None and state.last_node.in_tree
                assert state.last_node.block_id == table[state.num_cached - 1]
