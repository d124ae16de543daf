"""CPU versions of the elementwise ops: fewer passes over memory than the reference, same results.

Each follows its contract in :mod:`tokenmill.ops.registry`. In float32 and bfloat16 the
norms, rotary and SiLU-and-mul run the plugin's C kernels (:mod:`tokenmill_cpu.native_ops`) where they
were built, writing fresh outputs (inputs are never modified); otherwise float32 uses
torch's fused CPU kernels and half precision the reference, whose casts the contract
spells out and which torch's fused kernels would not reproduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.ops import reference
from tokenmill_cpu import native, native_ops
from tokenmill_cpu.bitmask import apply_token_bitmask


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = native.library()
    out = native_ops.rms_norm(lib, x, weight, eps) if lib is not None else None
    if out is not None:
        return out
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = native.library()
    out = native_ops.fused_add_rms_norm(lib, x, residual, weight, eps) if lib is not None else None
    if out is not None:
        return out
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    new_residual = torch.add(residual, x)
    return F.rms_norm(new_residual, (x.shape[-1],), weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    lib = native.library()
    out = native_ops.silu_and_mul(lib, x) if lib is not None else None
    if out is not None:
        return out
    if x.dtype != torch.float32:
        return reference.silu_and_mul(x)
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter], x[..., inter:]
    out = F.silu(gate)
    return out.mul_(up)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_size: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rotary_dim = cos_sin_cache.shape[-1]
    lib = native.library() if is_neox else None
    out = native_ops.rotary_neox(lib, positions, q, k, cos_sin_cache, head_size) if lib is not None else None
    if out is not None:
        return out
    if not is_neox or rotary_dim != head_size or q.dtype != torch.float32 or k.dtype != torch.float32:
        return reference.rotary_embedding(positions, q, k, cos_sin_cache, head_size, is_neox)
    half = rotary_dim // 2
    n = positions.shape[0]
    cos_sin = cos_sin_cache.index_select(0, positions.to(torch.long))
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(n, -1, head_size)
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype)
        lo, hi = out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=lo)
        lo.sub_(x2 * sin)
        torch.mul(x2, cos, out=hi)
        hi.add_(x1 * sin)
        return out.view(n, -1)

    return rotate(q), rotate(k)


CPU_OPS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": rotary_embedding,
    "apply_token_bitmask": apply_token_bitmask,
}
