"""Checks of attention backends against the core's reference backend, and of what they refuse.

Each case runs a few engine-like steps through the backend under test and, side by
side, through :class:`~tokenmill.attention.reference.ReferenceAttention` in float32 on
the CPU, and compares every step's output. Each backend keeps its own cache in its own
``kv_cache_shape``, so custom layouts are tested through their results; the default
layout is also checked slot by slot. Pages are handed out shuffled, block tables are
padded with live but foreign block ids, and the cache starts full of large values, so
reading outside a sequence's own context shows. q, k and v are strided views of one
fused projection, as models pass them.

Scenarios: ``prefill`` (fresh prompts), ``decode`` (one token per sequence after a
prefill), ``mixed`` (decodes, a continued chunk and a fresh prompt in one ragged batch)
and ``chunked`` (a prompt fed in chunks beside a decoding sequence), with block sizes
16 and 32, GQA ratios 1/2/4/8, head sizes 64 and 128, each declared dtype and, when
declared, a sliding window. The ``standard`` grid pairs every scenario with every GQA
ratio (block and head sizes alternate), the ``small`` grid (for Triton's slow
interpreter) runs each scenario and each ratio once, the ``full`` grid the whole product.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata, AttentionSpec, UnsupportedAttention

from tokenmill.conformance.results import Check, Skip
from tokenmill.conformance.tolerances import attention_tolerance, compare

KV_HEADS = 2
GQA_RATIOS = (1, 2, 4, 8)
BLOCK_SIZES = (16, 32)
HEAD_SIZES = (64, 128)
WINDOW = 8
#: Large garbage in never-written cache slots: a backend that reads them cannot stay within tolerance.
GARBAGE = 50.0

#: scenario -> steps; a step lists (sequence, number of new tokens).
SCENARIOS: dict[str, list[list[tuple[int, int]]]] = {
    "prefill": [[(0, 5), (1, 37), (2, 16)]],
    "decode": [[(0, 7), (1, 33), (2, 16), (3, 50)], [(0, 1), (1, 1), (2, 1), (3, 1)],
               [(0, 1), (1, 1), (2, 1), (3, 1)]],
    "mixed": [[(0, 20), (1, 40), (3, 33)], [(0, 1), (1, 9), (2, 13), (3, 1)]],
    "chunked": [[(0, 24), (1, 3)], [(0, 24), (1, 1)], [(0, 22), (1, 1)]],
}


@dataclass(frozen=True)
class Case:
    """One attention configuration and scenario."""

    scenario: str
    block_size: int
    ratio: int
    head_size: int
    dtype: str
    window: int | None = None

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(num_heads=KV_HEADS * self.ratio, num_kv_heads=KV_HEADS, head_size=self.head_size,
                             dtype=self.dtype, sliding_window=self.window)

    @property
    def id(self) -> str:
        win = f"-window{self.window}" if self.window else ""
        return f"{self.scenario}-bs{self.block_size}-gqa{self.ratio}-h{self.head_size}{win}"


def grid(dtypes: list[str], size: str, sliding_window: bool) -> list[Case]:
    """The cases to run: ``size`` is ``small``, ``standard`` or ``full`` (see the module doc)."""
    names = list(SCENARIOS)
    cases = []
    for dtype in dtypes:
        if size == "full":
            for sc, bs, r, hs in itertools.product(names, BLOCK_SIZES, GQA_RATIOS, HEAD_SIZES):
                cases.append(Case(sc, bs, r, hs, dtype))
        elif size == "small":
            # Each scenario once, each GQA ratio once; block and head sizes each in half the cases.
            for i, sc in enumerate(names):
                cases.append(Case(sc, BLOCK_SIZES[i % 2], GQA_RATIOS[i % len(GQA_RATIOS)],
                                  HEAD_SIZES[(i // 2) % 2], dtype))
        else:
            for i, sc in enumerate(names):
                for j, r in enumerate(GQA_RATIOS):
                    cases.append(Case(sc, BLOCK_SIZES[(i + j // 2) % 2], r, HEAD_SIZES[(j + i // 2) % 2], dtype))
        if sliding_window:
            cases.append(Case("chunked", 16, 4, 128, dtype, WINDOW))
            if size != "small":
                cases.append(Case("mixed", 32, 2, 64, dtype, WINDOW))
    return cases


def _meta(steps_state, step, block_size, device, gen):
    """Tensors of one step; ``steps_state[s]`` = (tokens so far, block list) per sequence, updated."""
    import torch

    seqs = [s for s, _ in step]
    qlens = [n for _, n in step]
    slens, slots = [], []
    for s, n in step:
        done, blocks = steps_state[s]
        slens.append(done + n)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(done, done + n)]
    width = max(len(steps_state[s][1]) for s in seqs) + 1
    table = torch.randint(0, steps_state["num_blocks"], (len(seqs), width), generator=gen, dtype=torch.int32)
    for row, s in enumerate(seqs):
        blocks = steps_state[s][1]
        table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)

    def build(dev):
        return AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
            block_tables=table.to(dev), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(qlens), max_seq_len=max(slens), query_lens_cpu=list(qlens), seq_lens_cpu=list(slens),
            block_size=block_size)

    for s, n in step:
        steps_state[s] = (steps_state[s][0] + n, steps_state[s][1])
    return build(device), build("cpu"), slots


def run_case(backend: type, case: Case, device, seed: int = 0) -> str:
    """Run ``case`` through ``backend`` on ``device`` and the reference; raise AssertionError on a mismatch."""
    import torch

    from tokenmill.attention.reference import ReferenceAttention

    spec = case.spec
    reason = backend.supports(spec)
    if reason:
        raise Skip(f"declared unsupported: {reason}")
    gen = torch.Generator().manual_seed(seed)
    steps = SCENARIOS[case.scenario]
    bs, hk, d, h = case.block_size, KV_HEADS, case.head_size, spec.num_heads
    totals: dict[int, int] = {}
    for step in steps:
        for s, n in step:
            totals[s] = totals.get(s, 0) + n
    needed = {s: -(-t // bs) for s, t in totals.items()}
    num_blocks = sum(needed.values()) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    state: dict = {"num_blocks": num_blocks}
    for s in sorted(needed):
        state[s] = (0, perm[:needed[s]])
        perm = perm[needed[s]:]

    dtype = getattr(torch, case.dtype)
    tested = backend(spec)
    ref = ReferenceAttention(AttentionSpec(h, hk, d, "float32", case.window))
    shape = backend.kv_cache_shape(num_blocks, bs, hk, d)
    cache = (torch.randn(shape, generator=gen) * GARBAGE).to(device=device, dtype=dtype)
    ref_cache = torch.zeros(ReferenceAttention.kv_cache_shape(num_blocks, bs, hk, d))
    default_layout = tuple(shape) == (2, num_blocks, bs, hk, d)
    atol, rtol = attention_tolerance(case.dtype)

    for i, step in enumerate(steps):
        meta, ref_meta, slots = _meta(state, step, bs, device, gen)
        num_tokens = sum(n for _, n in step)
        qkv = torch.randn(num_tokens, (h + 2 * hk) * d, generator=gen).to(dtype)
        q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
        q_dev, k_dev, v_dev = (x.to(device) for x in (q, k, v))
        backend.prepare(meta)
        out = tested.forward(q_dev.view(num_tokens, h, d), k_dev.view(num_tokens, hk, d),
                             v_dev.reshape(num_tokens, hk, d), cache, meta)
        ReferenceAttention.prepare(ref_meta)
        expected = ref.forward(q.float().view(num_tokens, h, d), k.float().view(num_tokens, hk, d),
                               v.float().reshape(num_tokens, hk, d), ref_cache, ref_meta)
        where = f"step {i + 1} of {len(steps)} (new tokens per sequence {[n for _, n in step]}, " \
                f"context lengths {ref_meta.seq_lens_cpu})"
        assert out.dtype == dtype, f"{where}: output dtype {out.dtype}, expected q's dtype {dtype}"
        assert out.device.type == torch.device(device).type, f"{where}: output on {out.device}, expected {device}"
        compare(f"{where}: attention output [tokens, heads*head_size]", out.reshape(num_tokens, h * d),
                expected, atol, rtol)
        if default_layout:
            flat = cache.view(2, num_blocks * bs, hk, d)
            idx = torch.tensor(slots, device=device)
            written_k = flat[0].index_select(0, idx).cpu()
            written_v = flat[1].index_select(0, idx).cpu()
            assert torch.equal(written_k, k.reshape(num_tokens, hk, d).to(dtype)), \
                f"{where}: the new keys are not in the cache at slot_mapping"
            assert torch.equal(written_v, v.reshape(num_tokens, hk, d).to(dtype)), \
                f"{where}: the new values are not in the cache at slot_mapping"
    return f"{len(steps)} step(s) match the reference (atol {atol:g}, rtol {rtol:g})"


def skip_slot_check(backend: type, device, dtype: str, seed: int = 0) -> str:
    """A step whose ``slot_mapping`` is all ``-1`` must leave the cache untouched."""
    import torch

    spec = AttentionSpec(4, KV_HEADS, 64, dtype)
    if backend.supports(spec):
        spec = AttentionSpec(4, 4, 64, dtype)
        if backend.supports(spec):
            raise Skip(f"declared unsupported: {backend.supports(spec)}")
    gen = torch.Generator().manual_seed(seed)
    bs, n = 16, 5
    shape = backend.kv_cache_shape(4, bs, spec.num_kv_heads, 64)
    cache = torch.randn(shape, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    before = cache.clone()
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.tensor([[2, 0]], dtype=torch.int32, device=device),
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
        max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n], block_size=bs)
    backend.prepare(meta)
    x = lambda heads: torch.randn(n, heads, 64, generator=gen).to(device=device, dtype=cache.dtype)  # noqa: E731
    backend(spec).forward(x(spec.num_heads), x(spec.num_kv_heads), x(spec.num_kv_heads), cache, meta)
    assert torch.equal(cache.cpu(), before.cpu()), "slot_mapping -1 must not write; the cache changed"
    return "slot -1 writes nothing"


class _PageRig:
    """What the block-moving checks share: a backend (4 query heads) over a paged cache of 8 pages
    of 16 tokens, a 32-token prefill written to pages 5 and 1 (table ``[5, 1, 6]``), then decodes."""

    bs, hk, d, ctx = 16, KV_HEADS, 64, 32

    def __init__(self, backend: type, device, dtype: str, seed: int):
        import torch

        spec = AttentionSpec(4, KV_HEADS, 64, dtype)
        if backend.supports(spec):
            raise Skip(f"declared unsupported: {backend.supports(spec)}")
        self.backend, self.device, self.tested = backend, device, backend(spec)
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = getattr(torch, dtype)
        self.cache = torch.zeros(backend.kv_cache_shape(8, self.bs, self.hk, self.d), dtype=self.dtype, device=device)

    def rand(self, n: int, heads: int):
        import torch

        return torch.randn(n, heads, self.d, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def step(self, tables, qlen: int, slen: int, slots, q, k, v):
        """One attention call: ``len(tables)`` sequences of ``qlen`` new tokens each, at context ``slen``."""
        import torch

        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([i * qlen for i in range(len(tables) + 1)], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([slen] * len(tables), dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=qlen, max_seq_len=slen, query_lens_cpu=[qlen] * len(tables),
            seq_lens_cpu=[slen] * len(tables), block_size=self.bs)
        self.backend.prepare(meta)
        return self.tested.forward(q, k, v, self.cache, meta)

    def prefill(self) -> None:
        bs, ctx, hk = self.bs, self.ctx, self.hk
        self.step([[5, 1, 6]], ctx, ctx, [5 * bs + i for i in range(bs)] + [1 * bs + i for i in range(bs)],
                  self.rand(ctx, 4), self.rand(ctx, hk), self.rand(ctx, hk))


def copy_blocks_check(backend: type, device, dtype: str, seed: int = 0) -> str:
    """``copy_blocks`` duplicates pages: a decode over the copies equals one over the originals."""
    import torch

    rig = _PageRig(backend, device, dtype, seed)
    bs, ctx, hk = rig.bs, rig.ctx, rig.hk
    rig.prefill()
    backend.copy_blocks([rig.cache], [(5, 2), (1, 7)])
    q, k, v = rig.rand(1, 4), rig.rand(1, hk), rig.rand(1, hk)
    out = rig.step([[5, 1, 6], [2, 7, 3]], 1, ctx + 1, [6 * bs, 3 * bs],
                   torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]))
    atol, rtol = attention_tolerance(dtype)
    compare("decode over copied pages vs over the originals", out[1:], out[:1], atol, rtol)
    return "copied pages attend like the originals"


def swap_blocks_check(backend: type, device, dtype: str, seed: int = 0) -> str:
    """``swap_blocks`` to a host cache and back into other pages: a decode over them equals one over the originals."""
    import torch

    rig = _PageRig(backend, device, dtype, seed)
    bs, ctx, hk, cache = rig.bs, rig.ctx, rig.hk, rig.cache
    host = torch.zeros(backend.kv_cache_shape(4, bs, hk, rig.d), dtype=rig.dtype)
    rig.prefill()
    q, k, v = rig.rand(1, 4), rig.rand(1, hk), rig.rand(1, hk)
    want = rig.step([[5, 1, 6]], 1, ctx + 1, [6 * bs], q, k, v)
    backend.swap_blocks([cache], [host], [(5, 2), (1, 3)])  # out (non-consecutive: two runs)
    garbage = torch.randn(cache.shape, generator=rig.gen).to(device=device, dtype=rig.dtype) * 100
    cache.copy_(garbage)  # the freed pages are reused by others
    backend.swap_blocks([host], [cache], [(2, 0), (3, 7)])  # back, into other pages
    got = rig.step([[0, 7, 4]], 1, ctx + 1, [4 * bs], q, k, v)
    atol, rtol = attention_tolerance(dtype)
    compare("decode over pages swapped out and back vs over the originals", got, want, atol, rtol)
    return "pages swapped to a host cache and back attend like the originals"


def refusal_specs(backend: type, dtypes_known=("float32", "float16", "bfloat16")) -> list[tuple[str, AttentionSpec]]:
    """Configurations outside ``backend``'s declaration, each with what makes it so."""
    out = []
    base = dict(num_heads=8, num_kv_heads=2, head_size=64, dtype="float32")
    if backend.head_sizes is not None:
        base["head_size"] = backend.head_sizes[0]
        bad = next(h for h in (72, 40, 200, 24, 264, 8) if h not in backend.head_sizes)
        out.append((f"head size {bad}", AttentionSpec(**{**base, "head_size": bad})))
    if backend.dtypes:
        base["dtype"] = backend.dtypes[0]
    for dt in dtypes_known:
        if dt not in backend.dtypes:
            out.append((f"dtype {dt}", AttentionSpec(**{**base, "dtype": dt})))
    if not backend.sliding_window:
        out.append(("sliding window", AttentionSpec(**{**base, "sliding_window": 16})))
    if not backend.gqa:
        out.append(("grouped-query attention", AttentionSpec(**base)))
        base["num_kv_heads"] = base["num_heads"]
    out.append(("num_heads not a multiple of num_kv_heads", AttentionSpec(**{**base, "num_heads": 6,
                                                                             "num_kv_heads": 4})))
    return out


def refusal_check(backend: type, what: str, spec: AttentionSpec) -> str:
    reason = backend.supports(spec)
    assert reason, f"supports() accepted {spec}, which is outside the declaration ({what})"
    assert isinstance(reason, str), f"supports() must return the reason as a str, got {type(reason).__name__}"
    try:
        backend(spec)
    except UnsupportedAttention:
        pass
    else:
        raise AssertionError(f"constructing the backend for {spec} ({what}) did not raise UnsupportedAttention")
    return f"refused: {reason}"


def declaration_check(backend: type, platform_names: list[str]) -> str:
    assert isinstance(backend, type) and issubclass(backend, AttentionBackend), \
        f"{backend!r} is not an AttentionBackend subclass"
    assert backend.name, f"{backend.__name__} has no name"
    assert backend.device_types, f"{backend.name} serves no platform (device_types is empty)"
    assert backend.forward is not AttentionBackend.forward, f"{backend.name} does not implement forward()"
    unknown = [d for d in backend.dtypes if d not in ("float32", "float16", "bfloat16")]
    assert not unknown, f"{backend.name} declares unknown dtypes {unknown}"
    accepted = [s for s in (AttentionSpec(8, 2, h, dt) for h in (64, 128, *(backend.head_sizes or ()))
                            for dt in backend.dtypes) if backend.supports(s) is None]
    assert accepted, f"{backend.name} accepts none of the common configurations (head size 64/128, its dtypes)"
    return (f"serves {list(backend.device_types)}, priority {backend.priority}, head sizes "
            f"{list(backend.head_sizes) if backend.head_sizes else 'any'}, dtypes {list(backend.dtypes)}, "
            f"sliding window {'yes' if backend.sliding_window else 'no'}, GQA {'yes' if backend.gqa else 'no'}")


def attention_checks(target, platform_name: str, device, device_skip: str | None, dtypes: list[str],
                     dtype_skips: dict[str, str], size: str) -> list[Check]:
    """Every attention check of the plugin's backends serving ``platform_name``."""
    checks = []

    def needs_device(fn):
        def run():
            if device_skip:
                raise Skip(device_skip)
            return fn()
        return run

    for backend in target.backends_for(platform_name):
        bname = backend.name or backend.__name__
        prefix = f"attention/{platform_name}/{bname}"
        checks.append(Check(f"{prefix}/declaration", "attention", "the backend declares what it supports",
                            lambda b=backend: declaration_check(b, target.platform_names())))
        mine = [dt for dt in dtypes if dt in backend.dtypes]
        for dt, why in dtype_skips.items():
            if dt in backend.dtypes:
                checks.append(Check(f"{prefix}/{dt}", "attention", f"{dt} attention", lambda w=why: _skip(w)))
        for case in grid(mine, size, bool(backend.sliding_window)):
            checks.append(Check(f"{prefix}/{case.dtype}/{case.id}", "attention",
                                f"{case.scenario} batch matches the reference ({case.dtype})",
                                needs_device(lambda b=backend, c=case: run_case(b, c, device))))
        if mine:
            checks.append(Check(f"{prefix}/{mine[0]}/slot-minus-one", "attention",
                                "slot_mapping -1 writes nothing",
                                needs_device(lambda b=backend, dt=mine[0]: skip_slot_check(b, device, dt))))
            checks.append(Check(f"{prefix}/{mine[0]}/copy-blocks", "attention",
                                "copy_blocks duplicates pages",
                                needs_device(lambda b=backend, dt=mine[0]: copy_blocks_check(b, device, dt))))
            checks.append(Check(f"{prefix}/{mine[0]}/swap-blocks", "attention",
                                "swap_blocks copies pages to a host cache and back (--preemption-mode swap)",
                                needs_device(lambda b=backend, dt=mine[0]: swap_blocks_check(b, device, dt))))
        for what, spec in refusal_specs(backend):
            checks.append(Check(f"refusal/{platform_name}/{bname}/{what.replace(' ', '-')}", "refusal",
                                f"supports() refuses {what} with a reason",
                                lambda b=backend, w=what, s=spec: refusal_check(b, w, s)))
    return checks


def _skip(reason: str):
    raise Skip(reason)
