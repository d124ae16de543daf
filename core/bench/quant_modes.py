"""``tokenmill bench throughput --quantization fp32,bf16,int8,w8a8,fp8,gptq,awq``: modes side by side.

One float checkpoint, every mode in one run, each in a fresh subprocess on the same
workload: ``fp32``/``bf16`` (dtype only), the online modes (``int8``, ``w8a8``, ``fp8``, on
float32 activations) and the checkpoint formats, written first by ``tokenmill quantize``
into a temporary directory (round-to-nearest; ``gptq``/``awq``: 4-bit, ``--quant-group-size``
inputs per group, on float32 activations; ``gptq-bf16``/``awq-bf16``: the same on bfloat16, where
the cpu plugin's int4 matmul serves them; ``ct-w4a16``, ``ct-w8a8``, ``ct-fp8``: compressed-tensors schemes). Per
mode: the bytes the model's quantizable linear layers hold (every tensor they keep, each
storage once; not the embeddings, norms, router or ``lm_head``), all weights' bytes,
output tok/s, and the share of greedy tokens equal to fp32's at the same position. A
table on stdout and a PNG of the three. ``--pairs N`` runs N rounds of all modes, interleaved, and
reports each mode's median tok/s with its range.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

#: mode -> (dtype, --quantization value, quantize_checkpoint arguments or None)
MODES = {
    "fp32": ("float32", None, None),
    "bf16": ("bfloat16", None, None),
    "int8": ("float32", "int8", None),
    "w8a8": ("float32", "w8a8", None),
    "fp8": ("float32", "fp8", None),
    "gptq": ("float32", None, dict(fmt="gptq", bits=4)),
    "awq": ("float32", None, dict(fmt="awq")),
    "gptq-bf16": ("bfloat16", None, dict(fmt="gptq", bits=4)),
    "awq-bf16": ("bfloat16", None, dict(fmt="awq")),
    "ct-w4a16": ("float32", None, dict(fmt="compressed-tensors", scheme="w4a16")),
    "ct-w8a8": ("float32", None, dict(fmt="compressed-tensors", scheme="w8a8")),
    "ct-fp8": ("float32", None, dict(fmt="compressed-tensors", scheme="fp8")),
}


def parse_modes(value: str) -> list[str]:
    modes = [m.strip().lower() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--quantization list: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--quantization list names a mode twice: {value!r}")
    return modes


def model_bytes(model) -> tuple[int, int]:
    """``(quantizable linear layers' bytes, all tensors' bytes)``, each storage counted once."""
    import torch

    from tokenmill.models.layers import Linear

    def tensors(module, recurse):
        yield from module.parameters(recurse=recurse)
        yield from module.buffers(recurse=recurse)
        if not recurse:
            yield from (v for v in vars(module).values() if isinstance(v, torch.Tensor))

    def total(items) -> int:
        seen, n = set(), 0
        for t in items:
            if t.is_mkldnn:  # an opaque repacked weight: no storage to share, its own bytes
                n += t.numel() * t.element_size()
                continue
            key = (t.untyped_storage().data_ptr(), t.device.type)
            if key not in seen:
                seen.add(key)
                n += t.untyped_storage().nbytes()
        return n

    linears = [m for m in model.modules() if isinstance(m, Linear)
               and not m.prefix.endswith("lm_head") and not m.prefix.endswith(".gate")]
    lin = total(t for m in linears for t in tensors(m, False))
    return lin, total(t for m in model.modules() for t in tensors(m, False))


def worker_result(llm, result: dict, outs) -> dict:
    """Add the memory figures and every greedy token to a tokenmill worker's result."""
    lin, everything = model_bytes(llm.engine.runner.model)
    q = llm.engine.runner.quantization
    result.update(linear_bytes=lin, weight_bytes=everything, tokens=[list(o.outputs[0].token_ids) for o in outs],
                  quantization=q.describe() if q is not None else "none",
                  implementation=f"{type(q).__name__} ({getattr(q, 'provider', '?')})" if q is not None else "-")
    return result


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(tokens, ref) for a, b in zip(x, y))
    return same / max(sum(map(len, ref)), 1)


def run(args, model: str, argv: list[str], subprocess_fn) -> int:
    """Quantize where needed, run every mode, print the table, write the PNG (and JSON)."""
    from tokenmill.quant.quantizer import quantize_checkpoint

    modes = parse_modes(args.quantization)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for mode in modes:
            dtype, online, ckpt = MODES[mode]
            paths[mode] = model
            if ckpt is not None:
                print(f"quantizing {model} to {mode} ...", file=sys.stderr, flush=True)
                kw = dict(ckpt)
                paths[mode] = str(quantize_checkpoint(model, os.path.join(tmp, mode), kw.pop("fmt"),
                                                      group_size=args.quant_group_size, **kw))
        for round_ in range(args.pairs):  # rounds interleave the modes, so machine noise hits all of them
            for mode in modes:
                dtype, online, _ = MODES[mode]
                print(f"running {mode} (round {round_ + 1}/{args.pairs}) ...", file=sys.stderr, flush=True)
                spec = json.dumps({"model": paths[mode], "dtype": dtype, "quantization": online})
                r = subprocess_fn(argv, "tokenmill", ["--_mode", spec])
                runs[mode].append(r)
                print(f"  {mode:<9} {r['output_tok_s']:,.1f} output tok/s, linear layers "
                      f"{r['linear_bytes'] / 2**20:.2f} MiB", file=sys.stderr, flush=True)
    results = []
    for mode, rs in runs.items():
        speeds = [x["output_tok_s"] for x in rs]
        r = dict(rs[0], mode=mode, output_tok_s=statistics.median(speeds), tok_s_runs=speeds)
        if any(x["tokens"] != r["tokens"] for x in rs):
            r["implementation"] += " (outputs differ between rounds)"
        results.append(r)
    base = next((r for r in results if r["mode"] == "fp32"), results[0])
    bf16 = next((r for r in results if r["mode"] == "bf16"), None)
    for r in results:
        r["agreement"] = agreement(r["tokens"], base["tokens"])
        r["speed_vs_base"] = r["output_tok_s"] / base["output_tok_s"]
        r["linear_vs_bf16"] = r["linear_bytes"] / bf16["linear_bytes"] if bf16 else None
    print(table(results, base["mode"]))
    print(f"\n{base['prompts']} prompts, {base['output_tokens']} output tokens per mode; one run, each mode in its "
          f"own process on the same workload, {args.pairs} interleaved round(s), median tok/s; agreement: share of "
          f"greedy tokens equal to {base['mode']}'s at the same position")
    if args.plot:
        plot(results, args.plot, base["mode"])
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "tokens"} for r in results], f, indent=2)
    return 0


def table(results: list[dict], base: str) -> str:
    """A Markdown table, one row per mode."""
    lines = [f"| mode | implementation | linear MiB | vs bf16 | all weights MiB | output tok/s | vs {base} | "
             f"agreement with {base} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    many = len(results[0].get("tok_s_runs", ())) > 1
    for r in results:
        vs = f"{r['linear_vs_bf16']:.0%}" if r["linear_vs_bf16"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['implementation']} | {r['linear_bytes'] / 2**20:.2f} | {vs} | "
                     f"{r['weight_bytes'] / 2**20:.2f} | {r['output_tok_s']:,.1f}{_spread(r) if many else ''} | "
                     f"{r['speed_vs_base']:.2f}x | "
                     f"{r['agreement']:.1%} |")
    return "\n".join(lines)


def _spread(r: dict) -> str:
    runs = r["tok_s_runs"]
    return f" ({min(runs):,.1f}-{max(runs):,.1f})"


def plot(results: list[dict], path: str, base: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = ((axes[0], [r["linear_bytes"] / 2**20 for r in results], "linear-layer weights (MiB)"),
              (axes[1], [r["speed_vs_base"] for r in results], f"output tok/s vs {base}"),
              (axes[2], [100 * r["agreement"] for r in results], f"greedy agreement with {base} (%)"))
    for ax, values, title in panels:
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f" if max(values) < 10 else "%.0f", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="gray", lw=1, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
