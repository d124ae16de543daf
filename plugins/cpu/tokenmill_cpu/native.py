"""Small C kernels for the cpu platform, built with the system compiler: decode attention over
the paged KV cache (:mod:`tokenmill_cpu.native_attention`), the block's elementwise ops
(:mod:`tokenmill_cpu.native_ops`), linears with few rows (:mod:`tokenmill_cpu.native_linear`,
:mod:`tokenmill_cpu.native_tiles`) and the one-call decode step built from them (:mod:`tokenmill_cpu.native_decoder`), in one library.

It is compiled on first use with ``cc -O3 -march=native -fopenmp`` into a cache
directory (``$TOKENMILL_CPU_KERNEL_CACHE``, default ``~/.cache/tokenmill/cpu-kernels``),
named by a hash of the source, the flags and the CPU, and loaded through ctypes; the
compiled library links the OpenMP runtime torch already loaded, so they share threads.
Without a compiler (or with ``TOKENMILL_CPU_NATIVE=0``) :func:`load` returns None and the
backend falls back to the torch path; :func:`status` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from tokenmill_cpu import native_attention, native_decoder, native_linear, native_ops, native_tiles

log = logging.getLogger(__name__)

SOURCE = native_attention.SOURCE + native_ops.SOURCE + native_linear.SOURCE + native_tiles.SOURCE + native_decoder.SOURCE

# -ffp-contract=fast: ISO C mode (-std=c11) otherwise keeps a * b + c as two roundings, two instructions
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ENV_DISABLE = "TOKENMILL_CPU_NATIVE"
ENV_CACHE = "TOKENMILL_CPU_KERNEL_CACHE"

_lock = threading.Lock()
_lib = None
_status = "not loaded yet"


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return os.uname().machine


def _cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "tokenmill" / "cpu-kernels")


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "paged_decode.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[:500]}")
        os.replace(out, target)  # atomic: concurrent builders agree on the result
    return target


def load():
    """The loaded library (ctypes.CDLL), or None when it cannot be built here (see :func:`status`)."""
    global _lib, _status
    with _lock:
        if _lib is not None or _status != "not loaded yet":
            return _lib
        if os.environ.get(ENV_DISABLE, "1") == "0":
            _status = f"disabled by {ENV_DISABLE}=0"
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            _status = "no C compiler (cc, gcc or clang) on PATH; decode attention, the block's elementwise ops and small linears use the torch paths"
            log.warning("tokenmill-cpu: %s", _status)
            return None
        try:
            import torch  # noqa: F401 - its OpenMP runtime must be loaded first so that we share it

            lib = ctypes.CDLL(str(_build(compiler)))
            parts = (native_attention, native_ops, native_linear, native_tiles, native_decoder)
            restypes = {name: t for part in parts for name, t in part.RESTYPES.items()}
            for name, argtypes in {name: a for part in parts for name, a in part.SIGNATURES.items()}.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = restypes.get(name)
        except Exception as exc:  # noqa: BLE001 - any build or load problem means: use the torch path
            _status = f"native kernel unavailable ({type(exc).__name__}: {exc}); decode attention, the block's elementwise ops and small linears use the torch paths"
            log.warning("tokenmill-cpu: %s", _status)
            return None
        _lib = lib
        _status = f"native decode kernel built with {Path(compiler).name}"
        return _lib


def library():
    """The loaded library, or None: :func:`load` once, then no lock on the hot path."""
    return _lib if _lib is not None else load()


def status() -> str:
    """Whether the native kernel is in use, and why not when it is not."""
    return _status
