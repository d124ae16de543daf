"""Plain-torch reference implementations of every op in :mod:`tokenmill.ops.registry`.

These are the ground truth the conformance suite compares plugin kernels against, and
the fallback for any op a platform does not accelerate. They follow the contracts in the
registry's docstring exactly, and mirror HF transformers' arithmetic (order of operations
and dtype casts) so that models built on them match HF bit-for-bit in float32.
All ops are functional: their inputs are never modified.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x**2) + eps))``, normalised in float32, cast back before the multiply."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual``; returns ``(rms_norm(new_residual), new_residual)``."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    # x: [N, heads, head_size]; cos/sin: [N, 1, rotary_dim // 2] already in x's dtype (as HF casts them).
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if passthrough.shape[-1]:
        out = torch.cat((out, passthrough), dim=-1)
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_size: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` features of every head of ``q`` and ``k`` by their position.

    ``cos_sin_cache[p]`` holds ``rotary_dim // 2`` cosines then as many sines. Neox style
    rotates the two halves of the rotary features (HF Llama), otherwise interleaved pairs.
    The cosines and sines are cast to ``q``'s dtype before use, as HF does.
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cos_sin = cos_sin_cache.index_select(0, positions.to(torch.long))
    cos, sin = cos_sin.chunk(2, dim=-1)
    n = positions.shape[0]
    q_out = _rotate(q.view(n, -1, head_size), cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype),
                    rotary_dim, is_neox)
    k_out = _rotate(k.view(n, -1, head_size), cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype),
                    rotary_dim, is_neox)
    return q_out.reshape(q.shape), k_out.reshape(k.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` of width ``2I``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, renormalize: bool) -> torch.Tensor:
    """Top-k mixture of SwiGLU experts (Mixtral): see the registry docstring for shapes.

    Routing probabilities are a float32 softmax; each expert's output is weighted in
    float32 and accumulated in ``x``'s dtype, in expert order (as HF does).
    """
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    # One pass over the experts actually chosen by some token; tokens gathered per expert.
    for e in torch.unique(topk_ids).tolist():
        if e >= num_experts:
            continue
        token_idx, slot = torch.where(topk_ids == e)
        h = silu_and_mul(F.linear(x[token_idx], w13[e]))
        h = F.linear(h, w2[e]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
    """Guided decoding's mask: ``logits`` with every token whose bit is clear set to ``-inf``, in the
    rows ``indices`` (all rows when None; the other rows and their bitmask rows are left alone)."""
    vocab = logits.shape[-1]
    if indices is not None:
        bitmask = bitmask[torch.tensor(indices, dtype=torch.int64, device=bitmask.device)]
    # expand on the logits' device: the int32 words are 32 times smaller than the mask they spell
    bitmask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:  # a narrow mask allows nothing past its last word
        allowed = F.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    if indices is None:
        return logits.masked_fill(~allowed[:, :vocab], float("-inf"))
    idx = torch.tensor(indices, dtype=torch.int64, device=logits.device)
    out = logits.clone()
    out[idx] = logits[idx].masked_fill(~allowed[:, :vocab], float("-inf"))
    return out


REFERENCE_OPS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "fused_moe": fused_moe,
    "apply_token_bitmask": apply_token_bitmask,
}
