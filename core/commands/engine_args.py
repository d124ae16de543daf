"""Engine flags shared by ``serve``, ``generate`` and ``bench`` (named like vLLM's)."""
from __future__ import annotations

import argparse


def _bytes(text: str) -> int:
    """Parse sizes like ``2GiB``, ``512MB``, ``1e9``."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def _int_list(text: str) -> tuple[int, ...]:
    """Parse ``16,64,256`` into ``(16, 64, 256)``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="platform name (cpu, cuda, rocm, xpu, tpu) or auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--quantization", default=None,
                   help="online quantization of a float checkpoint (int8, w8a8, fp8), or the checkpoint's own "
                        "format; default: read quantization_config from config.json")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--kv-cache-memory", type=_bytes, default=None, help="KV cache size in bytes (e.g. 2GiB)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache size in blocks of --block-size tokens, whatever the model (overrides --kv-cache-memory)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    g.add_argument("--preemption-mode", choices=["recompute", "swap"], default="recompute",
                   help="when the KV cache runs dry, preempted sequences are recomputed later (recompute) or "
                        "their KV blocks are copied to host memory and back (swap)")
    g.add_argument("--swap-space", type=float, default=4.0,
                   help="GiB of host memory per rank for swapped-out KV blocks (--preemption-mode swap); "
                        "when it is full, preempted sequences are recomputed")
    g.add_argument("--enforce-eager", action="store_true",
                   help="never capture decode steps into device graphs (platforms that declare graphs)")
    g.add_argument("--overlap", dest="overlap", action="store_true", default=None,
                   help="schedule step N+1 while step N runs and apply N's results while N+1 runs (default: on "
                        "where the platform computes asynchronously, e.g. GPUs and TPUs; off on cpu)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="schedule each step only after the previous one finished")
    g.add_argument("--engine-seed", type=int, default=0, help="seed of the shared sampling generator")
    g.add_argument("--structured-output-backend", default="auto", choices=["auto", "xgrammar", "outlines"],
                   help="guided-decoding backend of requests that name none (auto: xgrammar, then outlines)")
    g.add_argument("--no-jump-forward", dest="jump_forward", action="store_false",
                   help="constrained requests decode every forced token with its own step")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks that each hold a slice of every layer (torch.distributed over the platform's backend)")
    g.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=None,
                   help="where the ranks run: this process (uni), local worker processes (mp, the default for "
                        "more than one rank) or Ray actors on a running Ray cluster (ray; pip install 'tokenmill[ray]')")
    g.add_argument("--distributed-timeout", type=float, default=120.0,
                   help="seconds a collective or a rank's start-up may take before the step fails")
    g.add_argument("--reference-ops", action="store_true",
                   help="use the core's reference ops and attention, ignoring plugins' faster ones")
    b = p.add_argument_group("shape buckets (platforms with static shapes, e.g. tpu; --seq-buckets also sizes "
                             "decode graphs)")
    b.add_argument("--token-buckets", type=_int_list, default=None,
                   help="tokens per step to pad to, e.g. 16,64,256 (default: powers of two up to the token budget)")
    b.add_argument("--seq-buckets", type=_int_list, default=None,
                   help="sequences per step to pad to (default: powers of two up to --max-num-seqs)")
    b.add_argument("--width-buckets", type=_int_list, default=None,
                   help="block-table widths to pad to (default: powers of two up to max-model-len's blocks)")


def engine_kwargs(args) -> dict:
    """The ``LLM``/``EngineConfig`` keyword arguments from parsed flags."""
    return dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                quantization=getattr(args, "quantization", None),
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_memory=args.kv_cache_memory, num_blocks=getattr(args, "num_kv_blocks", None),
                block_size=args.block_size,
                enable_prefix_caching=args.enable_prefix_caching, seed=args.engine_seed, overlap=args.overlap,
                preemption_mode=args.preemption_mode, swap_space=args.swap_space, enforce_eager=args.enforce_eager,
                reference_ops=args.reference_ops, structured_output_backend=args.structured_output_backend,
                jump_forward=args.jump_forward, tensor_parallel_size=args.tensor_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend,
                distributed_timeout=args.distributed_timeout,
                token_buckets=args.token_buckets, seq_buckets=args.seq_buckets, width_buckets=args.width_buckets)
