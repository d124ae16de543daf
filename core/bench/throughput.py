"""``tokenmill bench throughput``: output tokens/s on a workload, tokenmill and its peers side by side.

Each engine runs in a fresh subprocess; only the generate call after the warm-up is timed.
Peers: HF transformers (``--compare hf``), the core's reference ops (``--compare reference``),
tokenmill with the overlap scheduler forced on or off (``--compare overlap``, ``--compare no-overlap``)
and vLLM-CPU from its own environment (``--against-vllm PYTHON``). ``--pairs N`` repeats the
round of engines N times interleaved (tokenmill, vLLM, tokenmill, vLLM, ...) so a noisy machine
shows up in the ratios; ``--sweep-prompts 16,64,256`` runs every engine at each number of
prompts (the workload's prompts cycled) and plots output tok/s against it. ``--quantization
fp32,bf16,int8,...`` (a comma-separated list) runs each quantization mode side by side instead
(see :mod:`tokenmill.bench.quant_modes`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import subprocess
import sys
import time

from tokenmill.bench import quant_modes, vllm_peer
from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
    p.add_argument("--workload", default=None, help="a workload JSON (e.g. the shared workload W)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts (default 64; with --workload: the workload's prompts, cycled to this many)")
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--compare", action="append", default=[], choices=["hf", "reference", "overlap", "no-overlap"],
                   help="also run HF transformers generate (hf), tokenmill on the core's reference ops and "
                        "attention (reference) or tokenmill with --overlap / --no-overlap on the same prompts; "
                        "repeatable")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--against-vllm", default=None, metavar="PYTHON",
                   help="also run vLLM-CPU with this interpreter (its own venv), with its best CPU setup")
    p.add_argument("--pairs", type=int, default=1, help="rounds of all engines (or of a --quantization list), interleaved (default 1)")
    p.add_argument("--sweep-prompts", default=None, metavar="N,N,...",
                   help="run at each number of prompts and plot output tok/s against it")
    p.add_argument("--plot", default="bench_throughput.png", help="PNG of the sweep or of a --quantization list ('' to skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    p.add_argument("--quant-group-size", type=int, default=128,
                   help="with a --quantization list: inputs per group of the gptq/awq/ct-w4a16 checkpoints")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    add_engine_arguments(p)


def _workload(args, tokenizer):
    from tokenmill.bench.workload import load_workload, synthetic_workload

    if args.workload:
        wl = load_workload(args.workload)
        if args.num_prompts:
            wl.prompts = [wl.prompts[i % len(wl.prompts)] for i in range(args.num_prompts)]
        return wl
    return synthetic_workload(tokenizer, args.num_prompts or 64, args.min_len, args.max_len, args.output_len,
                              args.seed)


def _run_tokenmill(args, model: str) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=model, **engine_kwargs(args))
    wl = _workload(args, llm.get_tokenizer())
    params = SamplingParams(max_tokens=wl.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in wl.warm], params)
    before = llm.stats()
    fwd0, step0, steps0 = before.forward_seconds, before.step_seconds, before.steps
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params)
    elapsed = time.perf_counter() - t0
    st = llm.stats()
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    step_s = st.step_seconds - step0
    return {"engine": "tokenmill", "workload": wl.name, "prompts": len(wl.prompts), "prompt_tokens": wl.prompt_tokens,
            "output_tokens": n_out, "seconds": elapsed, "output_tok_s": n_out / elapsed,
            "steps": st.steps - steps0, "outside_forward_share": 1 - (st.forward_seconds - fwd0) / step_s if step_s else 0,
            # wall time not covered by a running forward: what overlap scheduling hides
            "exposed_outside_forward_s": max(0.0, elapsed - (st.forward_seconds - fwd0)),
            "loop_outside_steps_s": elapsed - step_s, "platform": llm.engine.platform.name,
            "kernels": llm.engine.runner.kernels.providers, "attention": llm.engine.runner.backend.name,
            "first_tokens": outs[0].outputs[0].token_ids[:8], "outputs_sha": _outputs_sha(outs),
            **(quant_modes.worker_result(llm, {}, outs) if args._mode else {})}


def _outputs_sha(outs) -> str:
    """Digest of every prompt's first completion (the same digest the vLLM worker computes)."""
    toks = [list(o.outputs[0].token_ids) for o in outs]
    return hashlib.sha1(json.dumps(toks).encode()).hexdigest()[:12]


def _run_hf(args, model: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype or torch.float32).eval()
    wl = _workload(args, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def generate(prompts):
        outs = []
        for i in range(0, len(prompts), args.hf_batch_size):
            batch = prompts[i:i + args.hf_batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=wl.max_tokens,
                                  min_new_tokens=wl.max_tokens, do_sample=False, pad_token_id=pad)
            outs.extend(out[:, width:].tolist())
        return outs

    generate(wl.warm)
    t0 = time.perf_counter()
    outs = generate(wl.prompts)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o) for o in outs)
    return {"engine": "hf-generate", "workload": wl.name, "prompts": len(wl.prompts), "output_tokens": n_out,
            "seconds": elapsed, "output_tok_s": n_out / elapsed, "batch_size": args.hf_batch_size,
            "first_tokens": outs[0][:8]}


def _subprocess(argv: list[str], worker: str, extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "tokenmill", "bench", "throughput", *argv, "--_worker", worker, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _workload_file(args, model: str, tmp: str) -> str:
    """A W-format JSON of this run's workload, for peers that read files (vLLM)."""
    if args.workload:
        return os.path.abspath(args.workload)
    from transformers import AutoTokenizer

    wl = _workload(args, AutoTokenizer.from_pretrained(model, local_files_only=True))
    path = os.path.join(tmp, "workload.json")
    with open(path, "w") as f:
        json.dump({"prompts": wl.prompts, "warm": wl.warm, "max_tokens": wl.max_tokens}, f)
    return path


def plot(results: list[dict], path: str, title: str) -> None:
    """Output tok/s against the number of prompts, one line per engine (mean over pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in results):
        by_n: dict[int, list[float]] = {}
        for r in results:
            if r["engine"] == engine:
                by_n.setdefault(r["prompts"], []).append(r["output_tok_s"])
        xs = sorted(by_n)
        ax.plot(xs, [sum(by_n[x]) / len(by_n[x]) for x in xs], "o-", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts (= peak batch)")
    ax.set_ylabel("output tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_limit(args, model: str, results: list[dict]) -> None:
    """Each run's share of this machine's matmul limit for its workload, and the KV bytes per token."""
    from tokenmill.bench.limits import ModelShapes, engine_gemm_gflops, workload_limit

    try:
        shapes = ModelShapes.from_checkpoint(model)
    except (OSError, KeyError, ValueError) as exc:
        print(f"(no matmul limit: {model} is not a Llama-shaped checkpoint: {exc})")
        return
    dtype = "float32" if args.dtype == "auto" else args.dtype
    gflops, method = engine_gemm_gflops(shapes, dtype, args.device)
    size = {"float32": 4}.get(dtype, 2)
    print(f"\nmatmul limit: this machine's {dtype} matmul at the model's shapes (256 rows, "
          f"{method}, measured now) runs at {gflops:,.0f} GFLOP/s; {shapes.flops_per_token() / 1e6:.1f} MFLOP per output token, "
          f"{shapes.flops_per_token(lm_head=False) / 1e6:.1f} per prompt token; KV cache "
          f"{shapes.kv_bytes_per_token(size) / 1024:.0f} KiB per token in {dtype} (both engines store K and V per "
          f"layer and KV head)")
    prompt_tokens = {r["prompts"]: r["prompt_tokens"] for r in results if "prompt_tokens" in r}
    for r in results:
        pt = r.get("prompt_tokens", prompt_tokens.get(r["prompts"]))
        if pt is None:
            continue
        limit = workload_limit(shapes, pt, r["output_tokens"], gflops)
        r["matmul_limit_tok_s"], r["share_of_limit"] = limit, r["output_tok_s"] / limit
        print(f"  {r['engine']:<12} {r['prompts']:>5} prompts: limit {limit:,.0f} output tok/s, reached "
              f"{r['share_of_limit']:.0%}")


def run(args) -> int:
    from tokenmill.default_model import resolve_model

    model = resolve_model(args.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._worker:
        if args._mode:
            spec = json.loads(args._mode)
            model, args.dtype, args.quantization = spec["model"], spec["dtype"], spec["quantization"]
        if args._worker == "reference":
            args.reference_ops = True
        if args._worker in ("overlap", "no-overlap"):
            args.overlap = args._worker == "overlap"
        result = _run_hf(args, model) if args._worker == "hf" else _run_tokenmill(args, model)
        result["engine"] = {"tokenmill": "tokenmill", "reference": "tm-reference",
                            "overlap": "tm-overlap", "no-overlap": "tm-no-overlap"}.get(args._worker, result["engine"])
        print(json.dumps(result))
        return 0
    argv = [a for a in sys.argv[sys.argv.index("throughput") + 1:]]
    if args.pairs < 1:
        raise ValueError("--pairs must be at least 1")
    if args.quantization and "," in args.quantization:
        if args.compare or args.against_vllm or args.sweep_prompts:
            raise ValueError("a --quantization list runs tokenmill's modes side by side; it does not combine with "
                             "--compare, --against-vllm or --sweep-prompts")
        return quant_modes.run(args, model, argv, _subprocess)
    try:
        counts = [int(x) for x in args.sweep_prompts.split(",")] if args.sweep_prompts else [args.num_prompts]
    except ValueError:
        raise ValueError(f"--sweep-prompts must be comma-separated integers, got {args.sweep_prompts!r}") from None
    workers = ["tokenmill", *args.compare] + (["vllm"] if args.against_vllm else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        wfile = _workload_file(args, model, tmp) if args.against_vllm else None
        for count in counts:
            for _ in range(args.pairs):
                for worker in workers:
                    print(f"running {worker} ({count or 'all'} prompts) ...", file=sys.stderr, flush=True)
                    if worker == "vllm":
                        dtype = "float32" if args.dtype == "auto" else args.dtype
                        r = vllm_peer.run_offline(args.against_vllm, model, wfile, dtype, count or 0)
                    else:
                        r = _subprocess(argv + (["--num-prompts", str(count)] if count else []), worker)
                    results.append(r)
                    print(f"  {r['engine']:<12} {r['output_tokens']:>7} tokens in {r['seconds']:.2f}s = "
                          f"{r['output_tok_s']:,.0f} output tok/s", file=sys.stderr, flush=True)
    print(f"\n{'engine':<14}{'prompts':>8}{'output tok/s':>14}{'seconds':>10}{'vs tokenmill':>14}")
    base = None
    for r in results:
        if r["engine"] == "tokenmill":
            base = r["output_tok_s"]
        print(f"{r['engine']:<14}{r['prompts']:>8}{r['output_tok_s']:>14,.0f}{r['seconds']:>10.2f}"
              f"{r['output_tok_s'] / base:>13.2f}x")
    tm = results[0]
    print(f"\ntokenmill: {tm['steps']} steps, {tm['outside_forward_share']:.1%} of step time outside the model "
          f"forward; platform {tm['platform']}, attention {tm['attention']}")
    for r in results:
        if "exposed_outside_forward_s" in r:
            print(f"{r['engine']}: {r['exposed_outside_forward_s']:.3f} s of {r['seconds']:.3f} s wall with no forward "
                  f"running ({r['exposed_outside_forward_s'] / r['seconds']:.1%})")
    for r in results:
        if r["engine"] == "tokenmill" or r["prompts"] != tm["prompts"]:
            continue
        same = r["first_tokens"] == tm["first_tokens"]
        line = f"{r['engine']}: first greedy tokens of prompt 0 {'match' if same else 'DIFFER'}"
        if "outputs_sha" in r:
            line += f"; all outputs {'identical' if r['outputs_sha'] == tm['outputs_sha'] else 'DIFFER'}"
        print(line + f" ({tm['first_tokens']} vs {r['first_tokens']})")
    _print_limit(args, model, results)
    if len(counts) > 1 and args.plot:
        plot(results, args.plot, "offline output tok/s")
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0
