"""Guided decoding's ``apply_token_bitmask`` on the CPU through xgrammar's C++ kernel.

The reference expands every word into 32 booleans (a ``[rows, V]`` mask built in several
passes, with threads that a busy host makes wait on each other); xgrammar's kernel walks the
words once in one thread and writes ``-inf`` only where a bit is clear. Same contract as the
reference (:mod:`tokenmill.ops.registry`): functional, ``indices`` picks the rows, tokens past the
mask's last word are never allowed. Registered only where xgrammar imports.
"""
from __future__ import annotations

import torch

from tokenmill.ops import reference

try:
    from xgrammar import apply_token_bitmask_inplace as _xgr_apply
except ImportError:  # the reference serves
    _xgr_apply = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
    if (logits.device.type != "cpu" or bitmask.device.type != "cpu" or logits.dim() != 2 or bitmask.dim() != 2
            or logits.dtype not in _DTYPES or bitmask.dtype != torch.int32):
        return reference.apply_token_bitmask(logits, bitmask, indices)
    out = logits.clone()
    covered = min(logits.shape[1], 32 * bitmask.shape[1])
    rows = None if indices is None else list(indices)
    _xgr_apply(out, bitmask, vocab_size=covered, indices=rows, backend="cpu")
    if covered < logits.shape[1]:  # xgrammar leaves tokens past the mask as they are; the contract does not
        out[rows if rows is not None else slice(None), covered:] = float("-inf")
    return out


def available() -> bool:
    return _xgr_apply is not None
