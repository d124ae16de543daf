"""KVCacheManager: accounting, prefix reuse, eviction, salts, fork/copy-on-write (pure bookkeeping)."""
import subprocess
import sys

import pytest

from tokenmill.kv import BlockPool, KVCacheManager, RadixTree


def prefill(m: KVCacheManager, seq: int, tokens, salt=None, chunk=None) -> int:
    """What the scheduler does for a new prompt: match, allocate (in chunks), cache. Returns the hit."""
    hit = done = m.match_prefix(seq, tokens, salt)
    while done < len(tokens):
        n = min(chunk or len(tokens), len(tokens) - done)
        assert m.allocate(seq, done, n) is not None
        done += n
        m.cache_blocks(seq, tokens, done, salt)
        m.check_invariants()
    return hit


def decode(m: KVCacheManager, seq: int, tokens: list, new_tokens, salt=None) -> None:
    """Append tokens one step at a time (each is computed in its step), caching after each."""
    for t in new_tokens:
        assert m.allocate(seq, len(tokens), 1) is not None
        tokens.append(t)
        m.cache_blocks(seq, tokens, len(tokens), salt)
        m.check_invariants()


def test_no_torch_imported():
    code = "import sys, tokenmill.kv; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_accounting_through_allocate_append_free():
    m = KVCacheManager(num_blocks=10, block_size=4)
    assert (m.num_free_blocks, m.num_used_blocks, m.num_cached_blocks) == (10, 0, 0)
    toks = list(range(10))
    prefill(m, 1, toks)  # 3 blocks, 2 full and cached
    assert (m.num_free_blocks, m.num_used_blocks, m.num_cached_blocks) == (7, 3, 0)
    assert m.usage == pytest.approx(0.3)
    decode(m, 1, toks, [50, 51, 52])  # 13 tokens -> 4 blocks
    assert m.num_blocks_of(1) == 4 and m.num_used_blocks == 4
    m.free(1)
    m.check_invariants()
    # The 3 full blocks stay cached; the partial block went back to the free list.
    assert (m.num_free_blocks, m.num_used_blocks, m.num_cached_blocks) == (10, 0, 3)
    m.free(1)  # freeing again (abort after finish) is a no-op
    m.free(999)
    m.check_invariants()


def test_allocate_returns_none_and_changes_nothing():
    m = KVCacheManager(num_blocks=4, block_size=4)
    assert m.allocate(1, 0, 12) == []
    before = (m.block_table(1), m.num_free_blocks, m.num_used_blocks)
    assert m.blocks_needed(1, 12, 8) == 2
    assert m.allocate(1, 12, 8) is None
    assert (m.block_table(1), m.num_free_blocks, m.num_used_blocks) == before
    assert m.allocate(2, 0, 5) is None and m.block_table(2) == [] and 2 not in m
    assert m.allocate(1, 12, 4) == [] and m.num_free_blocks == 0
    m.check_invariants()


def test_blocks_needed_matches_allocate():
    m = KVCacheManager(num_blocks=32, block_size=4)
    for nc, nn in [(0, 1), (1, 3), (4, 9), (13, 0), (13, 3), (16, 1)]:
        need = m.blocks_needed(7, nc, nn)
        free = m.num_free_blocks
        assert m.allocate(7, nc, nn) == []
        assert free - m.num_free_blocks == need


def test_prefix_reuse_three_blocks_and_a_prompt_cached_whole():
    m = KVCacheManager(num_blocks=32, block_size=4)
    prefix = list(range(100, 112))  # 3 full blocks
    assert prefill(m, 1, prefix + [1, 2]) == 0
    assert prefill(m, 2, prefix + [3, 4, 5]) == 12
    assert m.block_table(1)[:3] == m.block_table(2)[:3]
    assert m.block_table(1)[3] != m.block_table(2)[3]
    assert all(m.ref_count(b) == 2 for b in m.block_table(1)[:3])
    # The whole prompt is cached: all but its last token are reused, that one is computed again.
    assert prefill(m, 4, prefix + [1]) == 12
    assert m.stats.hit_tokens == 24 and m.stats.queries_tokens == 14 + 15 + 13
    m.check_invariants()


def test_a_prompt_cached_whole_copies_its_last_block_then_takes_the_cached_one_back():
    m = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 112))  # 3 full blocks
    prefill(m, 1, prompt)
    cached = m.block_table(1)
    m.free(1)
    assert m.num_cached_blocks == 3
    free = m.num_free_blocks
    hit, cost = m.admission_cost(prompt, None, len(prompt))
    assert (hit, cost) == (11, 4)  # 3 cached blocks pinned, plus the copy of the last one
    assert m.match_prefix(2, prompt) == 11 == m.peek_prefix(prompt)
    assert m.num_free_blocks == free - 3
    copies = m.allocate(2, 11, 1)
    assert copies is not None and len(copies) == 1 and copies[0][0] == cached[2]
    copy = copies[0][1]
    assert m.block_table(2) == cached[:2] + [copy] and not m.is_cached(copy)
    assert m.num_free_blocks == free - 3  # the copy is taken, the cached last block is evictable again
    m.check_invariants()
    # Once computed, the copy duplicates the cached block: the table takes the cached one back
    # and the copy is freed, so what the sequence generates next is cached after it.
    m.cache_blocks(2, prompt, 12)
    assert m.block_table(2) == cached and m.ref_count(copy) == 0 and not m.is_cached(copy)
    assert m.num_free_blocks == free - 3
    m.check_invariants()
    tokens = list(prompt)
    decode(m, 2, tokens, [7, 8, 9, 10, 11])
    m.free(2)
    assert m.peek_prefix(tokens + [1]) == 16
    m.check_invariants()


def test_a_duplicate_computed_concurrently_is_swapped_for_the_cached_block():
    m = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(8))
    for seq in (1, 2):  # both admitted before either is cached: two copies of the same blocks
        assert m.match_prefix(seq, prompt) == 0
        assert m.allocate(seq, 0, 8) == []
    first, second = m.block_table(1), m.block_table(2)
    m.cache_blocks(1, prompt, 8)
    m.cache_blocks(2, prompt, 8)
    assert m.block_table(2) == first and all(m.ref_count(b) == 2 for b in first)
    assert all(m.ref_count(b) == 0 and not m.is_cached(b) for b in second)
    assert m.num_used_blocks == 2 and m.num_free_blocks == 14  # the duplicates went back to the free list
    tokens = list(prompt)
    decode(m, 2, tokens, [50, 51, 52, 53])
    m.free(1)
    m.free(2)
    assert m.peek_prefix(tokens + [0]) == 12  # sequence 2's generated block was cached too
    m.check_invariants()


def test_partial_blocks_are_not_shared():
    m = KVCacheManager(num_blocks=16, block_size=4)
    toks = list(range(10))  # blocks: full, full, partial (2 tokens)
    prefill(m, 1, toks)
    assert prefill(m, 2, toks) == 8
    t1, t2 = m.block_table(1), m.block_table(2)
    assert t1[:2] == t2[:2] and t1[2] != t2[2]
    assert not m.is_cached(t1[2]) and not m.is_cached(t2[2])
    m.free(1)
    m.free(2)
    assert m.num_cached_blocks == 2 and m.num_used_blocks == 0
    m.check_invariants()


def test_eviction_is_lru_and_leaves_first():
    m = KVCacheManager(num_blocks=8, block_size=2)
    a, b = [1, 1, 2, 2, 3, 3, 9], [5, 5, 6, 6, 9]  # a: 3 full blocks + 1 partial, b: 2 full + 1
    prefill(m, 1, a)
    prefill(m, 2, b)
    m.free(1)
    m.free(2)  # b released after a: a is least recently used
    assert m.num_cached_blocks == 5 and m.num_free_blocks == 8
    m.check_invariants()
    # 3 free blocks + 1 eviction: the deepest block of a goes, a's first two blocks stay usable.
    assert m.allocate(3, 0, 8) == [] and m.stats.evicted_blocks == 1
    assert m.match_prefix(4, a) == 4 and m.match_prefix(5, b) == 4
    m.free(4)
    m.free(5)  # b used more recently than a again
    m.free(3)
    assert (m.num_free_blocks, m.num_cached_blocks) == (8, 4)
    assert m.allocate(6, 0, 12) == []  # 6 blocks: 4 free, then a's two blocks, leaf first
    assert m.stats.evicted_blocks == 3
    assert m.match_prefix(7, a) == 0 and m.match_prefix(8, b) == 4
    m.check_invariants()


def test_eviction_never_takes_an_inner_node_first():
    m = KVCacheManager(num_blocks=5, block_size=1)
    prefill(m, 1, [1, 2, 3, 0])  # chain 1 -> 2 -> 3 -> 0 cached, one block free
    m.free(1)
    assert m.match_prefix(2, [1, 9]) == 1  # touches only the root-most node, making it the newest
    m.free(2)
    # 1 free + 2 evictions: the leaf (0), then the new leaf (3); never node 2, equally old but inner.
    assert m.allocate(3, 0, 3) == [] and m.stats.evicted_blocks == 2
    assert m.match_prefix(4, [1, 2, 3, 0]) == 2
    m.check_invariants()


def test_radix_tree_evicts_leaves_before_older_parents():
    pool = BlockPool(4)
    tree = RadixTree(pool, block_size=1)
    b0, b1, b2 = pool.take(), pool.take(), pool.take()
    n0 = tree.insert(tree.root(None), (0,), b0, tick=1)
    n1 = tree.insert(n0, (1,), b1, tick=5)
    n2 = tree.insert(tree.root(None), (2,), b2, tick=3)
    for node, tick in [(n1, 5), (n0, 1), (n2, 3)]:
        pool.decref(node.block_id)
        tree.on_unreferenced(node, tick)
    tree.check_invariants()
    # n0 is the oldest but has a child: n2 (next oldest leaf) goes, then n1, then n0.
    assert [tree.evict_lru() for _ in range(4)] == [b2, b1, b0, None]
    assert len(tree) == 0 and tree.num_unreferenced == 0


def test_referenced_blocks_are_never_evicted():
    m = KVCacheManager(num_blocks=4, block_size=2)
    prefill(m, 1, [1, 2, 3, 4, 5])  # 3 blocks held
    assert m.num_free_blocks == 1
    assert m.allocate(2, 0, 4) is None
    m.free(1)
    assert m.allocate(2, 0, 8) == [] and m.num_cached_blocks == 0
    m.check_invariants()


def test_salted_requests_never_share():
    m = KVCacheManager(num_blocks=32, block_size=4)
    toks = list(range(13))
    assert prefill(m, 1, toks, salt="alice") == 0
    assert prefill(m, 2, toks, salt="bob") == 0
    assert prefill(m, 3, toks) == 0
    assert prefill(m, 4, toks, salt="alice") == 12
    assert prefill(m, 5, toks, salt="carol") == 0
    assert m.block_table(4)[:3] == m.block_table(1)[:3]
    tables = [set(m.block_table(s)) for s in (1, 2, 3, 5)]
    assert all(not a & b for i, a in enumerate(tables) for b in tables[i + 1:])
    m.check_invariants()


def test_fork_copy_on_write():
    m = KVCacheManager(num_blocks=16, block_size=4)
    toks = list(range(6))  # one full block + a partial block with 2 tokens
    prefill(m, 1, toks)
    m.fork(1, 2)
    parent = m.block_table(1)
    assert m.block_table(2) == parent and all(m.ref_count(b) == 2 for b in parent)
    assert m.blocks_needed(2, 6, 1) == 1
    copies = m.allocate(2, 6, 1)  # child writes into the shared partial block: gets a copy
    assert copies is not None and len(copies) == 1
    src, dst = copies[0]
    assert src == parent[1] and m.block_table(2) == [parent[0], dst]
    assert m.block_table(1) == parent and m.ref_count(src) == 1
    assert m.allocate(1, 6, 1) == []  # the last holder writes in place
    assert m.block_table(1) == parent
    assert m.ref_count(parent[0]) == 2  # the full block stays shared
    m.check_invariants()
    m.free(1)
    m.free(2)
    assert m.num_used_blocks == 0 and m.num_cached_blocks == 1
    m.check_invariants()


def test_fork_children_diverge_and_cache_their_own_blocks():
    m = KVCacheManager(num_blocks=32, block_size=2)
    base = [7, 7, 8]
    prefill(m, 1, base)
    m.fork(1, 2)
    t1, t2 = list(base), list(base)
    decode(m, 1, t1, [1, 1, 1])
    decode(m, 2, t2, [2, 2, 2])
    assert m.block_table(1)[0] == m.block_table(2)[0]
    assert len(set(m.block_table(1)[1:]) | set(m.block_table(2)[1:])) == 4
    m.free(1)
    m.free(2)
    assert m.match_prefix(3, t1 + [0]) == 6 and m.match_prefix(4, t2 + [0]) == 6
    m.check_invariants()


def test_rewriting_a_cached_block_copies_it():
    m = KVCacheManager(num_blocks=16, block_size=4)
    toks = list(range(10))
    prefill(m, 1, toks)
    cached = m.block_table(1)[1]
    assert m.is_cached(cached) and m.ref_count(cached) == 1
    copies = m.allocate(1, 4, 4)  # a caller rewinding into cached positions must not corrupt the tree
    assert copies == [(cached, m.block_table(1)[1])] and m.num_cached_blocks == 1
    m.cache_blocks(1, toks, 8)
    m.cache_blocks(99, toks, 8)  # unknown sequence: no-op
    m.check_invariants()
    m.free(1)
    assert m.match_prefix(2, toks) == 8 and m.block_table(2)[1] == cached
    m.check_invariants()


def test_prefix_caching_off_never_shares():
    m = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    toks = list(range(13))
    assert prefill(m, 1, toks) == 0 and prefill(m, 2, toks) == 0
    assert not set(m.block_table(1)) & set(m.block_table(2))
    m.free(1)
    m.free(2)
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 32
    assert m.stats.hit_tokens == 0
    m.check_invariants()


def test_reset_prefix_cache_drops_only_unreferenced():
    m = KVCacheManager(num_blocks=16, block_size=2)
    prefill(m, 1, [1, 2, 3, 4, 5])
    prefill(m, 2, [9, 9, 9, 9, 9])
    m.free(1)
    m.reset_prefix_cache()
    assert m.num_cached_blocks == 0 and m.num_used_blocks == 3
    assert m.match_prefix(3, [1, 2, 3, 4, 5]) == 0 and m.match_prefix(4, [9, 9, 9, 9, 9]) == 4
    m.check_invariants()


def test_hundred_requests_share_a_500_token_prefix():
    bs = 16
    m = KVCacheManager(num_blocks=200, block_size=bs)
    prefix = [(i * 7) % 1000 for i in range(500)]
    hits = [prefill(m, r, prefix + [2000 + r] * 10, chunk=128) for r in range(100)]
    full = 500 // bs  # 31 blocks: the 32nd mixes prefix and suffix
    assert hits == [0] + [full * bs] * 99
    assert m.num_used_blocks == full + 100  # shared prefix + one private tail block each
    assert m.stats.hit_rate == pytest.approx(99 * 496 / (100 * 510))
    shared = m.block_table(0)[:full]
    assert all(m.block_table(r)[:full] == shared for r in range(100))
    assert all(m.ref_count(b) == 100 for b in shared)
    for r in range(100):
        m.free(r)
    assert m.num_used_blocks == 0 and m.num_cached_blocks == full
    m.check_invariants()


def test_multi_turn_reuses_previous_turn():
    bs = 4
    m = KVCacheManager(num_blocks=64, block_size=bs)
    prompt, expected = list(range(1, 18)), 0
    for turn in range(4):
        assert prefill(m, turn, prompt) == expected
        # The prefill samples the first output token; each later step computes the previous one.
        tokens = prompt + [100 + 10 * turn]
        for i in range(1, 7):
            assert m.allocate(turn, len(tokens) - 1, 1) is not None
            tokens.append(100 + 10 * turn + i)
            m.cache_blocks(turn, tokens, len(tokens) - 1)
        m.free(turn)
        m.check_invariants()
        # Turn k+1 reuses every full block turn k computed (its last sampled token never was).
        expected = (len(tokens) - 1) // bs * bs
        prompt = tokens + [200 + turn, 201 + turn, 202 + turn]
    assert m.stats.hit_tokens > 0
