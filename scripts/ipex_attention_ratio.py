"""Side by side in one process: one attention step through cpu-ipex (IPEX) and cpu (native kernel / SDPA).

Run in the IPEX venv (``.ci/ipex.sh`` builds it):  ``/work/venvs/ipex/bin/python scripts/ipex_attention_ratio.py``.
For each dtype and shape (Llama-8B-like heads: 32 query, 8 KV, head size 128; block size 16)
both backends run the same step alternately, ``--reps`` times; the first two of each are
dropped and the medians compared. Prints one line per shape with the speed-up of IPEX
over the plugin's own backend (>1: IPEX is faster). Ratios only: absolute times depend
on what else the machine runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill.attention.interface import AttentionMetadata, AttentionSpec
from tokenmill_cpu.attention import CpuAttention
from tokenmill_cpu.ipex import ipex_status, load_ipex
from tokenmill_cpu.ipex_attention import ipex_attention_backend

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
#: (sequences, context length, new tokens per sequence): decodes at three batch sizes, a prefill
SHAPES = ((1, 1024, 1), (16, 512, 1), (64, 256, 1), (4, 256, 256))


def step(nseq: int, ctx: int, qlen: int) -> tuple[AttentionMetadata, int]:
    per = -(-ctx // BLOCK)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(nseq)]
    slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK for i in range(nseq) for p in range(ctx - qlen, ctx)]
    return AttentionMetadata.from_lists([qlen] * nseq, [ctx] * nseq, tables, slots, BLOCK, "cpu"), nseq * per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    ipex = load_ipex()
    if ipex is None:
        raise SystemExit(f"IPEX is not usable here: {ipex_status()[1]}")
    backends = (CpuAttention, ipex_attention_backend(ipex))
    print(f"torch {torch.__version__}, {ipex_status()[1]}, {torch.get_num_threads()} threads, reps {args.reps}")
    for dtype in args.dtypes.split(","):
        spec, dt = AttentionSpec(HEADS, KV_HEADS, HEAD, dtype), getattr(torch, dtype)
        for nseq, ctx, qlen in SHAPES:
            _, blocks = step(nseq, ctx, qlen)
            made = [(b, b(spec), torch.randn(b.kv_cache_shape(blocks, BLOCK, KV_HEADS, HEAD)).to(dt)) for b in backends]
            n = nseq * qlen
            q, k, v = (torch.randn(n, h, HEAD).to(dt) for h in (HEADS, KV_HEADS, KV_HEADS))
            times: dict[str, list[float]] = {b.name: [] for b in backends}
            for _ in range(args.reps):
                for cls, layer, cache in made:
                    meta, _ = step(nseq, ctx, qlen)
                    t0 = time.perf_counter()
                    cls.prepare(meta)
                    layer.forward(q, k, v, cache, meta)
                    times[cls.name].append(time.perf_counter() - t0)
            own, theirs = (statistics.median(times[b.name][2:]) for b in backends)
            print(f"{dtype:8} seqs {nseq:3} context {ctx:5} new {qlen:4}: cpu {own * 1e3:8.2f} ms, "
                  f"cpu-ipex {theirs * 1e3:8.2f} ms, IPEX speed-up x{own / theirs:.2f}", flush=True)


if __name__ == "__main__":
    main()
