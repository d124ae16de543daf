"""Two ops for the ``example`` platform, written to the contracts in ``tokenmill.ops.registry``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]``, the SiLU rounded to x's dtype before the product (as the reference)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, cast back to x's dtype, then scaled by ``weight`` (as the reference)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
