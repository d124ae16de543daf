"""Stateful property test of KVCacheManager: random add / append / finish / abort / fork / drain / reset.

Besides ``check_invariants`` after every step, the test simulates the KV memory itself:
every write puts ``(salt, token)`` into the slot of the block the table names, every
copy-on-write copies a block's slots. Then for every live sequence, each computed position
must still read back its own ``(salt, token)``. That catches a referenced block being evicted
and reused, a shared or cached block being written, a wrong prefix hit and salts leaking.
"""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.kv import KVCacheManager

tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=14)


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 20), block_size=st.integers(2, 4),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, caching):
        self.m = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.seqs: dict[int, dict] = {}  # seq id -> {"tokens", "computed", "salt"}
        self.memory: dict[int, list] = {}  # block id -> slots of (salt, token)
        self.next_id = 0
        self.history: list[list[int]] = []  # past prompts and finished sequences, to collide with

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _step(self, sid: int, n: int) -> bool:
        """Allocate, copy, write and cache n more positions of sid; on shortage, preempt (free) it."""
        s, m = self.seqs[sid], self.m
        need, free = m.blocks_needed(sid, s["computed"], n), m.num_free_blocks
        before = (m.block_table(sid), free, m.num_used_blocks, m.num_cached_blocks)
        copies = m.allocate(sid, s["computed"], n)
        if copies is None:
            assert need > free
            assert before == (m.block_table(sid), m.num_free_blocks, m.num_used_blocks, m.num_cached_blocks)
            m.free(sid)
            del self.seqs[sid]
            return False
        # A copied block that no one else holds (a prompt cached whole) is evictable again at once.
        released = sum(1 for src, _ in copies if m.ref_count(src) == 0)
        assert free - m.num_free_blocks == need - released
        for src, dst in copies:  # the runner copies before the step's forward
            self.memory[dst] = list(self.memory.get(src, [None] * self.bs))
        table = m.block_table(sid)
        for p in range(s["computed"], s["computed"] + n):
            b = table[p // self.bs]
            assert m.ref_count(b) == 1 and not m.is_cached(b), f"write into shared/cached block {b}"
            self.memory.setdefault(b, [None] * self.bs)[p % self.bs] = (s["salt"], s["tokens"][p])
        s["computed"] += n
        m.cache_blocks(sid, s["tokens"], s["computed"], s["salt"])
        return True

    def _pick(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.seqs)))

    @rule(prompt=tokens_st, salt=st.sampled_from([None, "t1"]), chunk=st.integers(1, 8))
    def add(self, prompt, salt, chunk):
        self._add(prompt, salt, chunk)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=st.lists(st.integers(0, 3), max_size=5),
          salt=st.sampled_from([None, "t1"]), chunk=st.integers(1, 8))
    def add_related(self, data, suffix, salt, chunk):
        """A prompt that repeats or extends an earlier one (retries, multi-turn, shared system prompt)."""
        base = data.draw(st.sampled_from(self.history))
        prompt = base[:data.draw(st.integers(0, len(base)))] + suffix
        if prompt:
            self._add(prompt, salt, chunk)

    def _add(self, prompt, salt, chunk):
        self.history = (self.history + [list(prompt)])[-20:]
        sid = self._new_id()
        hit = self.m.match_prefix(sid, prompt, salt)
        whole = len(prompt) % self.bs == 0 and hit == len(prompt) - 1  # all but the last token
        assert hit < len(prompt) and (hit % self.bs == 0 or whole)
        if not self.m.enable_prefix_caching:
            assert hit == 0
        self.seqs[sid] = {"tokens": list(prompt), "computed": hit, "salt": salt}
        self._check_contents(sid)
        while self.seqs.get(sid) and self.seqs[sid]["computed"] < len(prompt):
            if not self._step(sid, min(chunk, len(prompt) - self.seqs[sid]["computed"])):
                break

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def append(self, data, new):
        sid = self._pick(data)
        self.seqs[sid]["tokens"].extend(new)
        self._step(sid, len(new))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        sid = self._pick(data)
        s = self.seqs.pop(sid)
        self.history = (self.history + [list(s["tokens"])])[-20:]
        self.m.cache_blocks(sid, s["tokens"], s["computed"], s["salt"])
        self.m.free(sid)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data):
        sid = self._pick(data)
        del self.seqs[sid]
        self.m.free(sid)
        self.m.free(sid)  # abort after finish: a no-op

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data)
        child = self._new_id()
        self.m.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = {"tokens": list(p["tokens"]), "computed": p["computed"], "salt": p["salt"]}
        assert self.m.block_table(child) == self.m.block_table(parent)

    @rule()
    def drain(self):
        """Take every allocatable block at once: all cached blocks must really be evictable."""
        n = self.m.num_free_blocks
        sid = self._new_id()
        if n:
            assert self.m.allocate(sid, 0, n * self.bs) is not None
        assert self.m.num_free_blocks == 0 and self.m.num_cached_blocks == 0
        self.m.check_invariants()
        self.m.free(sid)

    @rule()
    def reset(self):
        used = self.m.num_used_blocks
        self.m.reset_prefix_cache()
        assert self.m.num_cached_blocks == 0 and self.m.num_used_blocks == used

    def _check_contents(self, sid: int) -> None:
        s, table = self.seqs[sid], self.m.block_table(sid)
        assert len(table) * self.bs >= s["computed"]
        for p in range(s["computed"]):
            got = self.memory.get(table[p // self.bs], [None] * self.bs)[p % self.bs]
            assert got == (s["salt"], s["tokens"][p]), f"seq {sid} position {p}: {got}"

    @invariant()
    def accounting(self):
        if not hasattr(self, "m"):
            return
        self.m.check_invariants()
        m = self.m
        assert m.num_free_blocks + m.num_used_blocks == m.num_blocks
        assert m.num_cached_blocks <= m.num_free_blocks
        for sid in self.seqs:
            self._check_contents(sid)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
