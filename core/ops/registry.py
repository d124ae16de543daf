"""The kernel registry: op name -> implementation per platform, falling back to the reference.

The ops and their exact contracts (all functional: inputs are never modified):

``rms_norm(x, weight, eps) -> y``
    ``x``: ``[N, H]``; ``y = weight * (x / sqrt(mean(x**2) + eps))`` computed in float32 and
    cast back to ``x.dtype`` before the multiply (as HF Llama does).
``fused_add_rms_norm(x, residual, weight, eps) -> (y, new_residual)``
    ``new_residual = x + residual``; ``y = rms_norm(new_residual, weight, eps)``.
``rotary_embedding(positions, q, k, cos_sin_cache, head_size, is_neox) -> (q, k)``
    ``positions``: int64 ``[N]``; ``q``: ``[N, Hq*head_size]``; ``k``: ``[N, Hk*head_size]``;
    ``cos_sin_cache``: float32 ``[max_pos, rotary_dim]``, the first half cos, the second half sin
    (``rotary_dim <= head_size``; only the first ``rotary_dim`` features rotate). ``is_neox``:
    rotate halves (Llama/HF style) rather than interleaved pairs.
``silu_and_mul(x) -> y``
    ``x``: ``[N, 2I]``; ``y = silu(x[:, :I]) * x[:, I:]``.
``fused_moe(x, router_logits, w13, w2, top_k, renormalize) -> y``
    ``x``: ``[N, H]``; ``router_logits``: ``[N, E]``; ``w13``: ``[E, 2I, H]`` (gate rows then up
    rows); ``w2``: ``[E, H, I]``. Softmax over experts in float32, keep the ``top_k`` largest,
    renormalise them to sum 1 when ``renormalize``; ``y = sum_e p_e * (w2_e @ silu_and_mul(w13_e @ x))``.
``apply_token_bitmask(logits, bitmask, indices=None) -> masked_logits``
    ``logits``: float ``[N, V]``; ``bitmask``: int32 ``[N, W]`` (on the host or the device), bit
    ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed (xgrammar's layout); tokens past
    ``32 * W`` are never allowed. ``indices``: the rows to mask (None: all; a batch's unconstrained
    rows are left out, and their bitmask rows are not read). Returns ``logits`` with every
    disallowed token of those rows set to ``-inf`` (guided decoding, before sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "fused_moe", "apply_token_bitmask")


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of ``op`` for the platform named ``device_type`` (``"*"``: every platform).

    ``provider`` names who supplies it (a plugin or ``"reference"``) for reports.
    ``dtypes`` limits it to some dtypes (None: all). Higher ``priority`` wins.
    """

    op: str
    device_type: str
    fn: Callable
    provider: str = ""
    priority: int = 0
    dtypes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; known ops: {', '.join(OPS)}")


class Kernels:
    """The resolved ops for one platform and dtype: ``kernels.rms_norm(...)`` is a plain call.

    Built once at start-up from every registered :class:`KernelImpl`: for each op the
    highest-priority implementation registered for this platform (or ``"*"``) that
    accepts ``dtype``. The core registers the reference ops under ``"*"`` at a very low
    priority, so every op resolves. ``providers`` tells who supplies each op.
    """

    def __init__(self, device_type: str, impls: list[KernelImpl], dtype: str | None = None):
        self.device_type = device_type
        self.dtype = dtype
        self.providers: dict[str, str] = {}
        for op in OPS:
            candidates = [
                i for i in impls
                if i.op == op and i.device_type in (device_type, "*")
                and (dtype is None or i.dtypes is None or dtype in i.dtypes)
            ]
            if not candidates:
                raise ValueError(f"no implementation of op {op!r} for platform {device_type!r}")
            best = max(candidates, key=lambda i: (i.priority, i.device_type != "*"))
            setattr(self, op, best.fn)
            self.providers[op] = best.provider or "plugin"

    def __repr__(self) -> str:
        return f"Kernels({self.device_type}: {self.providers})"
