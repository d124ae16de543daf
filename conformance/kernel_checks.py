"""Checks of kernel overrides against the core's reference ops (:mod:`tokenmill.ops.reference`).

For each op a plugin registers, in each dtype it serves, a few input sets (odd sizes,
strided views as models pass them, edge values) go through the override on the device
and through the reference on the CPU. Outputs must match within the tolerances of
:mod:`tokenmill.conformance.tolerances`, have the reference's shapes and dtypes, and the
inputs must come back unchanged (every op is functional).
"""
from __future__ import annotations

from tokenmill.ops.registry import OPS, KernelImpl

from tokenmill.conformance.results import Check, Skip
from tokenmill.conformance.tolerances import compare, kernel_tolerance


def _randn(gen, *shape, scale: float = 1.0):
    import torch

    return torch.randn(*shape, generator=gen) * scale


def _inputs(op: str, gen) -> list[tuple[str, tuple, dict]]:
    """``(label, args, kwargs)`` input sets for ``op`` in float32 on the CPU (cast and moved later)."""
    import torch

    from tokenmill.ops.rope import RopeConfig, build_cos_sin_cache

    if op in ("rms_norm", "fused_add_rms_norm"):
        sets = []
        for rows, hidden, eps in ((1, 128, 1e-6), (7, 1000, 1e-5), (33, 512, 1e-6)):
            wide = _randn(gen, rows, hidden + 64, scale=2.0)
            x = wide[:, :hidden]  # a strided view, as a slice of a fused projection
            w = _randn(gen, hidden, scale=0.3) + 1.0
            args = (x, w, eps) if op == "rms_norm" else (x, _randn(gen, rows, hidden, scale=3.0), w, eps)
            sets.append((f"{rows}x{hidden}", args, {}))
        return sets
    if op == "rotary_embedding":
        sets = []
        for n, hq, hk, head, rot, neox in ((5, 4, 2, 64, 64, True), (9, 8, 2, 128, 128, True),
                                           (6, 4, 4, 64, 32, True), (7, 2, 1, 64, 64, False)):
            cache = build_cos_sin_cache(RopeConfig(head_size=head, rotary_dim=rot, max_position=300))
            qkv = _randn(gen, n, (hq + 2 * hk) * head)
            q, k, _ = qkv.split([hq * head, hk * head, hk * head], dim=-1)
            positions = torch.randint(0, 300, (n,), generator=gen)
            sets.append((f"{n}tok-h{head}-rot{rot}-{'neox' if neox else 'gptj'}",
                         (positions, q, k, cache, head, neox), {}))
        return sets
    if op == "silu_and_mul":
        return [(f"{rows}x2x{inter}", (_randn(gen, rows, 2 * inter, scale=3.0),), {})
                for rows, inter in ((1, 128), (6, 688), (17, 256))]
    if op == "fused_moe":
        sets = []
        for n, hidden, inter, experts, top_k, renorm in ((5, 64, 32, 4, 2, True), (9, 64, 48, 8, 2, False)):
            sets.append((f"{n}tok-e{experts}-top{top_k}-{'renorm' if renorm else 'raw'}",
                         (_randn(gen, n, hidden), _randn(gen, n, experts), _randn(gen, experts, 2 * inter, hidden,
                                                                                   scale=0.1),
                          _randn(gen, experts, hidden, inter, scale=0.1), top_k, renorm), {}))
        return sets
    if op == "apply_token_bitmask":
        sets = []
        for rows, vocab in ((1, 32), (5, 1000), (3, 4099)):
            words = (vocab + 31) // 32
            bits = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=gen, dtype=torch.int64)
            bits[0, 0] = -1  # every token of the first word allowed, and a row allowing almost nothing
            if rows > 1:
                bits[1] = 0
                bits[1, words - 1] = 1 << ((vocab - 1) % 32)
            sets.append((f"{rows}x{vocab}", (_randn(gen, rows, vocab, scale=4.0), bits.to(torch.int32)), {}))
        # some rows of a batch (the constrained ones), a mask narrower than the vocabulary
        logits, bits = sets[1][1]
        sets.append(("5x1000-rows-0-3-4", (logits, bits), {"indices": [0, 3, 4]}))
        sets.append(("5x1000-narrow-rows-1-2", (logits, bits[:, :20].contiguous()), {"indices": [1, 2]}))
        return sets
    raise Skip(f"no inputs defined for op {op!r}")


def _cast(value, dtype, device, keep_float32: bool):
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not keep_float32:
            value = value.to(dtype)
        # Keep strided views strided on the device: copy the base, then take the same view.
        if value.device.type != torch.device(device).type:
            if not value.is_contiguous() and value.dim() == 2:
                base = torch.empty((value.shape[0], value.stride(0)), dtype=value.dtype)
                base[:, :value.shape[1]] = value
                value = base.to(device)[:, :value.shape[1]]
            else:
                value = value.to(device)
    return value


def run_kernel(impl: KernelImpl, dtype_name: str, device, seed: int = 0) -> str:
    """Compare ``impl`` with the reference op on every input set of its op."""
    import torch

    from tokenmill.ops.reference import REFERENCE_OPS

    dtype = getattr(torch, dtype_name)
    reference = REFERENCE_OPS[impl.op]
    atol, rtol = kernel_tolerance(dtype_name)
    gen = torch.Generator().manual_seed(seed)
    labels = []
    for label, args, kwargs in _inputs(impl.op, gen):
        # The rotary cos/sin cache stays float32 (the op's contract); everything else takes the dtype.
        dev_args = [_cast(a, dtype, device, impl.op == "rotary_embedding" and i == 3) for i, a in enumerate(args)]
        ref_args = [_cast(a, dtype, "cpu", impl.op == "rotary_embedding" and i == 3) for i, a in enumerate(args)]
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in dev_args]
        got = impl.fn(*dev_args, **kwargs)
        want = reference(*ref_args, **kwargs)
        for a, b in zip(dev_args, before):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), f"{label}: the op modified an input in place (ops are functional)"
        got_t = got if isinstance(got, tuple) else (got,)
        want_t = want if isinstance(want, tuple) else (want,)
        assert len(got_t) == len(want_t), f"{label}: returned {len(got_t)} tensors, the reference {len(want_t)}"
        for j, (g, w) in enumerate(zip(got_t, want_t)):
            name = f"{impl.op} {label} output {j}"
            assert isinstance(g, torch.Tensor), f"{name}: not a tensor ({type(g).__name__})"
            assert g.dtype == w.dtype, f"{name}: dtype {g.dtype}, the reference gives {w.dtype}"
            assert g.device.type == torch.device(device).type, f"{name}: on {g.device}, expected {device}"
            compare(name, g, w, atol, rtol)
        labels.append(label)
    return f"{len(labels)} input sets match the reference (atol {atol:g}, rtol {rtol:g})"


def kernel_checks(target, platform_name: str, device, device_skip: str | None, dtypes: list[str],
                  dtype_skips: dict[str, str]) -> list[Check]:
    """One check per (kernel the plugin registers for ``platform_name``, dtype it serves)."""
    checks = []
    impls = target.kernels_for(platform_name)
    for impl in impls:
        assert impl.op in OPS
        prefix = f"kernel/{platform_name}/{impl.op}"
        if sum(i.op == impl.op for i in impls) > 1:  # several of one op (e.g. a vendor library's): name whose
            prefix += f"/{impl.provider or 'plugin'}"
        if impl.device_type == "*":
            prefix += "@any-platform"
        served = [d for d in dtypes if impl.dtypes is None or d in impl.dtypes]
        for dt in served:
            def run(impl=impl, dt=dt):
                if device_skip:
                    raise Skip(device_skip)
                return run_kernel(impl, dt, device)
            checks.append(Check(f"{prefix}/{dt}", "kernel", f"{impl.op} matches the reference op in {dt}", run))
        for dt, why in dtype_skips.items():
            if impl.dtypes is None or dt in impl.dtypes:
                checks.append(Check(f"{prefix}/{dt}", "kernel", f"{impl.op} in {dt}", lambda w=why: _skip(w)))
        if not served and not dtype_skips:
            checks.append(Check(f"{prefix}/dtypes", "kernel", f"{impl.op} serves a dtype of the platform",
                                lambda i=impl: _fail(f"serves dtypes {list(i.dtypes)}, none of the platform's "
                                                     f"{dtypes}")))
    return checks


def _skip(reason: str):
    raise Skip(reason)


def _fail(message: str):
    raise AssertionError(message)
