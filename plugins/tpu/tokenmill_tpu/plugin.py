"""The hooks tokenmill-tpu registers (entry point ``tpu`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up, and
torch_xla is imported only when the platform is asked whether it is available.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_tpu.platform import TpuPlatform

    return [TpuPlatform()]


# Ragged paged attention with static-shape K/V writes (tokenmill_tpu.attention). The ops
# (norms, rotary, activation) are the core's reference: plain torch, which XLA traces as is.
@hookimpl
def tokenmill_attention_backends():
    from tokenmill_tpu.attention import XlaPagedAttention

    return [XlaPagedAttention]


def conformance_facts() -> dict:
    """Which attention path serves, for the conformance report's header (not a hook)."""
    from tokenmill_tpu.attention import MODE_ENV, attention_mode

    try:
        return {"xla attention": attention_mode(), "set by": MODE_ENV}
    except Exception as exc:  # noqa: BLE001 - informational
        return {"xla attention": f"unknown ({type(exc).__name__}: {exc})"}
