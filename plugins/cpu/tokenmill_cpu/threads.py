"""Thread settings for CPU inference: one compute thread per physical core this process may use.

Torch defaults to one thread per logical CPU; on machines with SMT two threads then share
a core's vector units and memory port and matmuls get slower, not faster. Applied once,
when the first CPU attention layer is built, and never against the user's wishes:
``TOKENMILL_CPU_THREADS=N`` forces N, and an explicit ``OMP_NUM_THREADS`` is left alone.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)
ENV_THREADS = "TOKENMILL_CPU_THREADS"

_lock = threading.Lock()
_configured: int | None = None


def physical_cores_available() -> int:
    """Physical cores among the CPUs this process may run on (logical count when unknown)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
        for block in blocks:
            fields = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines()))
            if fields.get("processor", "").isdigit() and int(fields["processor"]) in cpus and "core id" in fields:
                cores.add((fields.get("physical id", "0"), fields["core id"]))
    except OSError:
        pass
    return len(cores) or len(cpus) or 1


def configure_threads() -> int:
    """Set torch's intra-op threads as described above (once); returns the thread count in use."""
    global _configured
    import torch

    with _lock:
        if _configured is not None:
            return _configured
        forced = os.environ.get(ENV_THREADS)
        if forced:
            torch.set_num_threads(max(1, int(forced)))
        elif not os.environ.get("OMP_NUM_THREADS"):
            cores = physical_cores_available()
            if torch.get_num_threads() > cores:
                log.info("tokenmill-cpu: %d torch threads -> %d (one per physical core)", torch.get_num_threads(), cores)
                torch.set_num_threads(cores)
        _configured = torch.get_num_threads()
        return _configured
