"""``tokenmill bench profile``: where a decode step and a prefill step spend their time, per batch size.

For each batch size B, B requests of ``--prompt-len`` random tokens run through the engine in
this process; the prefill steps and the following ``--decode-steps`` decode steps are timed
per component:

- the layer linears by projection (qkv, o, gate_up, down, experts) and the LM head, each with
  its achieved GFLOP/s (2·M·K·N over the time spent in it),
- attention (the platform's backend, paged KV write included), every registered kernel op by
  name (norms, rotary, activation, ...), the embedding,
- Python and tensor glue inside the forward (forward time minus the components above),
- sampling (logits to token ids), building the step's tensors, and everything outside the
  runner (scheduling, KV bookkeeping, output updates).

Components are timed by wrapping the model's modules and ops in this profiling process only
(the serving path is untouched), with a ``platform.synchronize()`` after each, so on an
asynchronous device the figures are exact but the step is slower than unprofiled. The result
is a table per phase (share of step time, ms per step) and a stacked-bar PNG.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict

from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
    p.add_argument("--batch-sizes", default="1,8,32,64,256", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="bench_profile.png", help="PNG of the shares ('' to skip)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here")
    p.add_argument("--against-vllm", default=None, metavar="PYTHON",
                   help="also time vLLM-CPU's prefill and decode steps at the same batch sizes (its own venv), "
                        "after ours, in the same run")
    add_engine_arguments(p)


class _Timer:
    """Exclusive seconds (and matmul FLOPs) per component: a call's time minus its timed callees'."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)    # exclusive
        self.inclusive: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self._children: list[float] = []  # per open call: seconds spent in timed callees

    def wrap(self, name: str, fn, flops=None):
        def timed(*args, **kwargs):
            self.sync()
            self._children.append(0.0)
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                self.sync()
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._children.pop()
                if self._children:
                    self._children[-1] += elapsed
            self.seconds[name] += elapsed - inner
            self.inclusive[name] += elapsed
            if flops is not None:
                self.flops[name] += flops(*args, **kwargs)
            return out
        return timed

    def take(self) -> tuple[dict, dict, dict]:
        out = dict(self.seconds), dict(self.inclusive), dict(self.flops)
        self.seconds.clear()
        self.inclusive.clear()
        self.flops.clear()
        return out


def _linear_kind(prefix: str) -> str:
    last = prefix.rsplit(".", 1)[-1] or "linear"
    if ".experts" in prefix or ".w1" in prefix or ".w2" in prefix or ".w3" in prefix:
        return "linear experts"
    return "lm_head" if last == "lm_head" else f"linear {last.removesuffix('_proj')}"


def instrument(engine, timer: _Timer) -> None:
    """Wrap the runner, the model's linears, attention backends, kernel ops and embedding with ``timer``."""
    from tokenmill.models.layers import Embedding, Linear

    runner = engine.runner
    model = runner.model
    for module in model.modules():
        if isinstance(module, Linear):
            def flops(x, *a, _m=module, **k):
                return 2.0 * (x.numel() // x.shape[-1]) * _m.in_features * _m.out_features
            module.forward = timer.wrap(_linear_kind(module.prefix), module.forward, flops)
        elif isinstance(module, Embedding):
            module.forward = timer.wrap("embedding", module.forward)
        attn = getattr(module, "attn", None)
        if attn is not None and hasattr(attn, "forward") and not isinstance(attn, type):
            attn.forward = timer.wrap("attention", attn.forward)
    kernels = runner.kernels
    for op in list(kernels.providers):
        setattr(kernels, op, timer.wrap(op, getattr(kernels, op)))
    if not isinstance(getattr(model, "lm_head", None), Linear):
        def head_flops(hidden):
            return 2.0 * hidden.shape[0] * model.lm_head.weight.shape[1] * model.lm_head.weight.shape[0]
        model.compute_logits = timer.wrap("lm_head", model.compute_logits, head_flops)
    fused = getattr(model, "fused_decode", None)  # a platform's own path for some steps (Platform.wrap_model)
    if fused is not None:
        fused.run = timer.wrap("fused decode layers", fused.run)
    model.forward = timer.wrap("forward", model.forward)
    runner._sample = timer.wrap("sampling", runner._sample)
    runner._build = timer.wrap("build inputs", runner._build)
    runner.execute = timer.wrap("runner", runner.execute)


_RENAME = {"forward": "forward glue (python, views)", "runner": "runner other (logits, copies)"}


def _profile(engine, timer: _Timer, plans: list, batch: int, args, vocab: int) -> dict:
    from tokenmill.sampling_params import SamplingParams

    rng = random.Random(args.seed + batch)
    params = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", [rng.randrange(3, vocab) for _ in range(args.prompt_len)], params)
    acc = {ph: {"steps": 0, "tokens": 0, "wall": 0.0, "sec": defaultdict(float), "incl": defaultdict(float),
                "flops": defaultdict(float)} for ph in ("prefill", "decode")}
    while engine.has_unfinished():
        plans.clear()
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        sec, incl, fl = timer.take()
        if not plans:
            continue
        num_tokens, num_seqs = plans[-1]
        a = acc["decode" if num_tokens == num_seqs else "prefill"]
        a["steps"] += 1
        a["tokens"] += num_tokens
        a["wall"] += wall
        sec["outside runner"] = max(0.0, wall - incl.get("runner", 0.0))
        for k, v in sec.items():
            a["sec"][_RENAME.get(k, k)] += v
        for k, v in incl.items():
            a["incl"][k] += v
        for k, v in fl.items():
            a["flops"][k] += v
    result = {"batch": batch}
    for ph, a in acc.items():
        n = max(1, a["steps"])
        result[ph] = {"steps": a["steps"], "tokens_per_step": a["tokens"] / n, "step_ms": 1e3 * a["wall"] / n,
                      "ms": {k: 1e3 * v / n for k, v in sorted(a["sec"].items(), key=lambda kv: -kv[1])},
                      "gflop_s": {k: a["flops"][k] / a["incl"][k] / 1e9 for k in a["flops"] if a["incl"].get(k)}}
    return result


def format_tables(results: list[dict]) -> str:
    """One markdown table per phase: ms per step and share of the step for each component, per batch."""
    out = []
    for ph in ("decode", "prefill"):
        comps: list[str] = []
        for r in results:
            comps += [k for k in r[ph]["ms"] if k not in comps]
        head = "| component | " + " | ".join(f"B={r['batch']}" for r in results) + " |"
        lines = [f"{ph} steps: ms per step (share of step)", head, "|---|" + "---|" * len(results)]
        lines.append("| step | " + " | ".join(f"{r[ph]['step_ms']:.2f} ms, {r[ph]['tokens_per_step']:.0f} tok"
                                              for r in results) + " |")
        if all("vllm" in r for r in results):
            key = "decode_step_ms" if ph == "decode" else "prefill_ms"
            ours = (lambda r: r[ph]["step_ms"]) if ph == "decode" else (lambda r: r[ph]["step_ms"] * r[ph]["steps"])
            what = "step" if ph == "decode" else "whole prefill of the batch"
            lines.append(f"| vLLM-CPU {what} (ours / vLLM) | " + " | ".join(
                f"{r['vllm'][key]:.2f} ms ({ours(r) / r['vllm'][key]:.2f}x)" if r["vllm"][key] else "n/a"
                for r in results) + " |")
        for c in comps:
            cells = []
            for r in results:
                ms, total = r[ph]["ms"].get(c, 0.0), r[ph]["step_ms"] or float("nan")
                g = r[ph]["gflop_s"].get(c)
                cells.append(f"{ms:.2f} ({100 * ms / total:.0f}%)" + (f", {g:.0f} GF/s" if g else ""))
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, ph in zip(axes, ("decode", "prefill")):
        comps: list[str] = []
        for r in results:
            comps += [k for k in r[ph]["ms"] if k not in comps]
        labels = [str(r["batch"]) for r in results]
        bottom = [0.0] * len(results)
        cmap = plt.get_cmap("tab20")
        for i, c in enumerate(comps):
            share = [100 * r[ph]["ms"].get(c, 0.0) / (r[ph]["step_ms"] or 1) for r in results]
            ax.bar(labels, share, bottom=bottom, label=c, color=cmap(i % 20))
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("share of step time (%)")
        ax.set_title(f"{ph} step")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.config import EngineConfig

    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > 4096:
        raise ValueError(f"--batch-sizes must be integers in [1, 4096], got {args.batch_sizes!r}")
    if not 1 <= args.prompt_len <= 32768 or not 1 <= args.decode_steps <= 1024:
        raise ValueError("--prompt-len must be in [1, 32768] and --decode-steps in [1, 1024]")
    kwargs = engine_kwargs(args)
    kwargs["max_num_seqs"] = max(kwargs.get("max_num_seqs") or 0, max(sizes))
    if (kwargs.get("tensor_parallel_size") or 1) > 1:
        raise ValueError("bench profile times one process: run it with --tensor-parallel-size 1")
    config = EngineConfig.from_kwargs(args.model, **kwargs)
    engine = EngineCore(config)
    timer = _Timer(engine.platform.synchronize)
    instrument(engine, timer)
    plans: list[tuple[int, int]] = []
    execute = engine.executor.execute

    def tracked(plan):
        plans.append((sum(s.num_new for s in plan.seqs), len(plan.seqs)))
        return execute(plan)
    engine.executor.execute = tracked
    vocab = engine.runner.model.hf_config.vocab_size
    results = []
    for b in sizes:
        print(f"batch {b}: {b} x {args.prompt_len}-token prompts, {args.decode_steps} decode steps ...",
              file=sys.stderr, flush=True)
        results.append(_profile(engine, timer, plans, b, args, vocab))
    if args.against_vllm:
        from tokenmill.bench import vllm_peer

        print("vLLM: the same batch sizes ...", file=sys.stderr, flush=True)
        dtype = str(engine.runner.dtype).removeprefix("torch.")
        for r, v in zip(results, vllm_peer.run_steps(args.against_vllm, config.model.model, dtype, sizes, args.prompt_len,
                                                     args.decode_steps, args.seed, vocab)):
            r["vllm"] = v
    print(format_tables(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0
