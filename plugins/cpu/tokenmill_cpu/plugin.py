"""The hooks tokenmill-cpu registers (entry point ``cpu`` in the group ``tokenmill``).

Kept free of heavy imports: the plugin manager imports this module at start-up.
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

TOKENMILL_CONTRACT = "1.0"


@hookimpl
def tokenmill_platforms():
    from tokenmill_cpu.platform import CpuPlatform

    return [CpuPlatform()]


# CPU kernels that beat the reference ops (IPEX, oneDNN paths) register here through
# ``tokenmill_kernels``; until then every op falls back to the core's reference.
