"""A radix tree over full KV blocks: automatic prefix sharing (SGLang's RadixAttention on pages).

Each node stands for one full block: its key is the tuple of the block's token ids and its
path from the root is the whole prefix before it, so two sequences share a node exactly when
they share every token up to the end of that block. There is one root per salt (``None`` is
a salt of its own), so different tenants never share blocks.

The tree does not own reference counts (the :class:`BlockPool` does); it reads them to know
which nodes may go. A node is evictable when its block has reference count 0 and it has no
children. Evictable leaves sit in a heap ordered by ``(last_access, -depth)`` with lazy
deletion: an entry is valid only while the node is still in the tree, still an unreferenced
leaf, and still carries the entry's ``last_access``; stale entries are skipped on pop.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Iterator, Sequence

from tokenmill.kv.block_pool import BlockPool


class RadixNode:
    """One cached full block: ``key`` (its token ids), ``block_id``, ``parent``, ``children``."""

    __slots__ = ("key", "block_id", "parent", "children", "last_access", "depth", "in_tree")

    def __init__(self, key: tuple | None, block_id: int | None, parent: RadixNode | None, depth: int) -> None:
        self.key = key
        self.block_id = block_id
        self.parent = parent
        self.children: dict[tuple, RadixNode] = {}
        self.last_access = 0
        self.depth = depth
        self.in_tree = True

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        return f"RadixNode(block={self.block_id}, depth={self.depth}, children={len(self.children)})"


class RadixTree:
    """The prefix tree of one KV cache, with LRU eviction of unreferenced leaves."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._roots: dict[Hashable, RadixNode] = {}
        self._by_block: dict[int, RadixNode] = {}
        self._heap: list[tuple[int, int, int, RadixNode]] = []
        self._entry_ids = itertools.count()
        self._clock = 0
        self.num_unreferenced = 0  # nodes whose block has ref 0: exactly the evictable-in-order set

    # ---- lookup -------------------------------------------------------------------------------
    def tick(self) -> int:
        """Advance and return the logical clock used for ``last_access``."""
        self._clock += 1
        return self._clock

    def root(self, salt: Hashable) -> RadixNode:
        """The root of ``salt``'s partition (created on first use)."""
        node = self._roots.get(salt)
        if node is None:
            node = self._roots[salt] = RadixNode(None, None, None, 0)
        return node

    def node_of(self, block_id: int) -> RadixNode | None:
        """The node holding ``block_id``, or None if the block is not cached."""
        return self._by_block.get(block_id)

    def __len__(self) -> int:
        return len(self._by_block)

    def match(self, salt: Hashable, token_ids: Sequence[int], max_blocks: int) -> list[RadixNode]:
        """Nodes of the longest cached run of full blocks prefixing ``token_ids`` (at most ``max_blocks``)."""
        node = self._roots.get(salt)
        path: list[RadixNode] = []
        bs = self.block_size
        while node is not None and len(path) < max_blocks:
            i = len(path)
            node = node.children.get(tuple(token_ids[i * bs:(i + 1) * bs]))
            if node is not None:
                path.append(node)
        return path

    # ---- mutation -----------------------------------------------------------------------------
    def insert(self, parent: RadixNode, key: tuple, block_id: int, tick: int) -> RadixNode:
        """Add a child holding ``block_id`` (which a live sequence references) under ``parent``."""
        assert len(key) == self.block_size and key not in parent.children, key
        assert block_id not in self._by_block, f"block {block_id} already cached"
        assert self.pool.ref_count(block_id) > 0, "only referenced blocks are inserted"
        node = RadixNode(key, block_id, parent, parent.depth + 1)
        node.last_access = tick
        parent.children[key] = node
        self._by_block[block_id] = node
        return node

    def touch(self, node: RadixNode, tick: int) -> None:
        """Mark ``node`` used at ``tick`` (requeue it if it is an evictable leaf)."""
        node.last_access = tick
        self._push_if_evictable(node)

    def on_unreferenced(self, node: RadixNode, tick: int) -> None:
        """The last table holding ``node``'s block let go: the block is now cached-only."""
        self.num_unreferenced += 1
        self.touch(node, tick)

    def on_referenced(self, node: RadixNode) -> None:
        """A table took ``node``'s block while it was cached-only (its heap entry goes stale)."""
        self.num_unreferenced -= 1

    def evict_lru(self) -> int | None:
        """Remove the least-recently-used unreferenced leaf; return its block id (None if nothing is evictable).

        The block is neither free nor referenced afterwards: the caller claims or releases it.
        """
        while self._heap:
            last_access, _, _, node = heapq.heappop(self._heap)
            if not self._is_evictable(node) or node.last_access != last_access:
                continue
            parent = node.parent
            del parent.children[node.key]
            del self._by_block[node.block_id]
            node.in_tree = False
            self.num_unreferenced -= 1
            if parent.is_root:
                if not parent.children:
                    self._drop_root(parent)
            else:
                self._push_if_evictable(parent)
            return node.block_id
        return None

    def _drop_root(self, root: RadixNode) -> None:
        # Salts come and go with tenants; empty roots would otherwise pile up forever.
        for salt, r in list(self._roots.items()):
            if r is root:
                del self._roots[salt]
                return

    def _is_evictable(self, node: RadixNode) -> bool:
        return node.in_tree and not node.children and self.pool.ref_count(node.block_id) == 0

    def _push_if_evictable(self, node: RadixNode) -> None:
        if node.is_root or not self._is_evictable(node):
            return
        heapq.heappush(self._heap, (node.last_access, -node.depth, next(self._entry_ids), node))
        if len(self._heap) > 2 * len(self._by_block) + 64:
            self._compact()

    def _compact(self) -> None:
        # Stale entries outnumber live nodes: rebuild from the nodes that are evictable now.
        self._heap = [(n.last_access, -n.depth, next(self._entry_ids), n)
                      for n in self._by_block.values() if self._is_evictable(n)]
        heapq.heapify(self._heap)

    # ---- inspection ---------------------------------------------------------------------------
    def nodes(self) -> Iterator[RadixNode]:
        """Every non-root node, parents before children."""
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if not node.is_root:
                yield node
            stack.extend(node.children.values())

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree's structure, block index or eviction heap is inconsistent."""
        seen: dict[int, RadixNode] = {}
        unreferenced = 0
        for root in self._roots.values():
            assert root.block_id is None and root.depth == 0 and root.in_tree
        for node in self.nodes():
            assert node.in_tree and node.parent is not None
            assert node.parent.children.get(node.key) is node, "child not under its key"
            assert node.depth == node.parent.depth + 1
            assert len(node.key) == self.block_size, "only full blocks are cached"
            assert node.block_id not in seen, f"block {node.block_id} in two tree nodes"
            seen[node.block_id] = node
            assert not self.pool.is_free(node.block_id), f"free block {node.block_id} is in the tree"
            if self.pool.ref_count(node.block_id) == 0:
                unreferenced += 1
            elif not node.parent.is_root:
                # A referenced node under an unreferenced parent would pin a cached block forever.
                assert self.pool.ref_count(node.parent.block_id) > 0, (
                    f"referenced block {node.block_id} under unreferenced block {node.parent.block_id}")
        assert seen == self._by_block, "block index disagrees with the tree"
        assert unreferenced == self.num_unreferenced, (unreferenced, self.num_unreferenced)
        live = {(id(n), last) for last, _, _, n in self._heap}
        for node in seen.values():
            if self._is_evictable(node):
                assert (id(node), node.last_access) in live, f"evictable {node} missing from the heap"
