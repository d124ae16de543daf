"""Guided decoding's ``apply_token_bitmask`` on the CPU, in numpy on the calling thread.

The reference expands every word into 32 booleans with torch ops (several passes, with intra-op
threads that a busy host makes wait on each other); xgrammar's C++ kernel walks the words one by
one. Here numpy unpacks the masked rows' bytes into booleans in one pass and writes ``-inf`` where
a bit is clear, through the logits' bit pattern, so bfloat16 needs no conversion: one thread, a
few vectorized calls per step. Same contract as the reference (:mod:`tokenmill.ops.registry`):
functional, ``indices`` picks the rows, tokens past the mask's last word are never allowed.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenmill.ops import reference

# -inf as each dtype's bits, viewed as an integer numpy knows
_NEG_INF = {
    torch.float32: (torch.int32, np.float32(-np.inf).view(np.int32)),
    torch.bfloat16: (torch.int16, np.uint16(0xFF80).view(np.int16)),
    torch.float16: (torch.int16, np.float16(-np.inf).view(np.int16)),
}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
    if (logits.device.type != "cpu" or bitmask.device.type != "cpu" or logits.dim() != 2 or bitmask.dim() != 2
            or logits.dtype not in _NEG_INF or bitmask.dtype != torch.int32):
        return reference.apply_token_bitmask(logits, bitmask, indices)
    int_dtype, neg_inf = _NEG_INF[logits.dtype]
    out = logits.contiguous().clone()
    vocab = out.shape[1]
    words = bitmask.contiguous().numpy()
    rows = slice(None) if indices is None else np.asarray(indices, dtype=np.intp)
    allowed = np.unpackbits(words[rows].view(np.uint8), axis=1, bitorder="little")
    flat = out.view(int_dtype).numpy()  # shares out's memory
    covered = min(vocab, allowed.shape[1])
    # integer ops, not np.where / putmask: those run element by element, these are SIMD (about 6x)
    blocked = allowed[:, :covered].astype(flat.dtype)
    blocked -= 1  # all ones where the bit is clear, 0 where it is set
    kept = flat[rows, :covered] & ~blocked
    kept |= blocked & neg_inf
    flat[rows, :covered] = kept
    if covered < vocab:
        flat[rows, covered:] = neg_inf
    return out
