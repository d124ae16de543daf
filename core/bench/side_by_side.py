"""``tokenmill bench serve --against-vllm PYTHON|URL``: tokenmill and vLLM-CPU side by side in one run.

With ``--launch MODEL``, the same concurrency levels run against vLLM-CPU's OpenAI server,
started from that environment's interpreter on the same checkpoint (or the URL is used as
is). The engines take turns (``--pairs N`` rounds, one server up at a time so they never
share the cores), and the table gives each figure per round with the tokenmill/vLLM ratio;
the plot draws both engines. The greedy text each engine returned at each level is
compared, so a ratio is only quoted for the same work. Both engines get the same KV budget
(vLLM's ``VLLM_CPU_KVCACHE_SPACE``, passed to tokenmill as ``--kv-cache-memory`` unless
``--launch-args`` sizes its cache), and the KV bytes per token each engine's pool implies are
checked against the checkpoint's config. ``--prompt-lens`` runs its cases here instead
(:mod:`tokenmill.bench.prompt_lens`).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import urllib.request

from tokenmill.bench import prompt_lens, vllm_peer
from tokenmill.bench.serve import (auth_headers, launch_server, launched_checkpoint, measure, mean, prompt_text,
                                   stop_server)


def kv_budget_args(args) -> tuple[str, ...]:
    """Flags giving tokenmill vLLM's KV budget (:data:`vllm_peer.KV_GIB`), unless ``--launch-args`` sizes its cache."""
    given = [a.split("=", 1)[0] for a in shlex.split(args.launch_args)]
    if "--kv-cache-memory" in given or "--num-kv-blocks" in given:
        return ()
    return ("--kv-cache-memory", f"{vllm_peer.KV_GIB}GiB")


def _pool_tokens(base: str) -> int | None:
    """The KV pool in tokens a tokenmill server reports (``/get_server_info``)."""
    try:
        with urllib.request.urlopen(base + "/get_server_info", timeout=10) as r:
            return int(json.loads(r.read())["max_total_num_tokens"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def kv_lines(model_dir: str, dtype: str, tm_tokens: int | None, vllm_tokens: int | None) -> list[str]:
    """KV bytes per token from the checkpoint's config, against each engine's own pool size for its budget."""
    from tokenmill.bench.limits import ModelShapes

    try:
        shapes = ModelShapes.from_checkpoint(model_dir)
    except (OSError, KeyError, ValueError):
        return []
    size = 4 if dtype == "float32" else 2
    per, budget = shapes.kv_bytes_per_token(size), vllm_peer.KV_GIB << 30
    lines = [f"KV cache per token in {dtype}: {per:,} bytes from config.json (K and V x {shapes.num_layers} layers x "
             f"{shapes.num_kv_heads} KV heads x {shapes.head_size} x {size} B)"]

    def check(n: int) -> str:
        got = budget / n
        return f"{got:,.0f} B per token ({'matches' if abs(got - per) <= 0.01 * per else 'DIFFERS from'} config.json)"

    if tm_tokens:
        lines.append(f"  tokenmill: its {vllm_peer.KV_GIB} GiB pool holds {tm_tokens:,} tokens (/get_server_info) = "
                     f"{check(tm_tokens)}")
    if vllm_tokens:
        lines.append(f"  vLLM: logs 'KV cache size: {vllm_tokens:,} tokens' for VLLM_CPU_KVCACHE_SPACE="
                     f"{vllm_peer.KV_GIB} = {check(vllm_tokens)}")
    return lines


def run_side_by_side(args, levels: list[int], cases: list[dict] | None = None) -> int:
    """tokenmill and vLLM in turns, ``--pairs`` rounds, then one table of per-round figures and ratios.

    ``cases`` (from ``--prompt-lens``): run those prompt-length cases instead of one prompt at each level."""
    if not args.launch:
        raise ValueError("--against-vllm needs --launch MODEL: both engines serve the same checkpoint")
    model_dir = launched_checkpoint(args)
    prompt = prompt_text(args) if cases is None else None
    headers = auth_headers(args)
    limit = prompt_lens.matmul_limit(model_dir, args.dtype) if cases is not None else None
    extra = kv_budget_args(args)
    runs: dict[str, list[list[dict]]] = {"tokenmill": [], "vllm": []}
    caches: dict[str, list[dict]] = {"tokenmill": [], "vllm": []}
    pools: dict[str, int | None] = {"tokenmill": None, "vllm": None}

    def bench(engine: str, base: str, model: str | None) -> None:
        if cases is None:
            res = measure(base, headers, model, prompt, levels, args)[1]
        else:
            res, cache = prompt_lens.measure_cases(base, headers, model, cases, args)
            caches[engine].append(cache)
        runs[engine].append(res)

    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "vllm.log")
        for k in range(args.pairs):
            print(f"round {k + 1}/{args.pairs}: tokenmill", file=sys.stderr, flush=True)
            proc, base = launch_server(args, extra)
            try:
                pools["tokenmill"] = _pool_tokens(base) if extra else None
                bench("tokenmill", base, None)
            finally:
                stop_server(proc)
            print(f"round {k + 1}/{args.pairs}: vLLM", file=sys.stderr, flush=True)
            with vllm_peer.vllm_server(args.against_vllm, model_dir, args.dtype, log_path=log) as vbase:
                if not vllm_peer.is_url(args.against_vllm):
                    with open(log, errors="replace") as f:
                        pools["vllm"] = vllm_peer.logged_kv_tokens(f.read())
                bench("vllm", vbase, vllm_peer.served_model_name(vbase))
    kv = kv_lines(model_dir, args.dtype, pools["tokenmill"], pools["vllm"])
    if cases is not None:
        same = prompt_lens.report(args, runs, caches, limit, kv)
    else:
        table, same = side_by_side_table(runs, levels)
        print(f"\n{args.num_requests} streaming requests per level, max_tokens {args.max_tokens}, "
              f"{args.pairs} round(s), servers in turns")
        print(table)
        print("\n".join(kv))
        if args.plot:
            plot_side_by_side(runs, levels, args.plot, f"{os.path.basename(model_dir)}: tokenmill vs vLLM")
            print(f"plot: {args.plot}")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(runs, f, indent=2)
    failed = any(r["failed"] for eng in runs.values() for rnd in eng for r in rnd)
    return 1 if failed or not same else 0


def _mean_of(rounds: list[list[dict]], i: int, key: str) -> float:
    return mean([rnd[i][key] for rnd in rounds])


def side_by_side_table(runs: dict[str, list[list[dict]]], levels: list[int]) -> tuple[str, bool]:
    """A markdown table: per level and metric, each round's figure for both engines and the mean ratio.

    Returns the table and whether both engines produced the same greedy text at every level."""
    metrics = [("output_tok_s", "out tok/s", "{:,.0f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:,.0f}"),
               ("ttft_p99_ms", "TTFT p99 ms", "{:,.0f}"), ("itl_mean_ms", "ITL mean ms", "{:.1f}")]
    lines = ["| conc | metric | tokenmill | vLLM | ratio |", "|---|---|---|---|---|"]
    same = True
    for i, c in enumerate(levels):
        for key, label, fmt in metrics:
            cells = [" / ".join(fmt.format(rnd[i][key]) for rnd in runs[eng]) for eng in ("tokenmill", "vllm")]
            ratio = _mean_of(runs["tokenmill"], i, key) / _mean_of(runs["vllm"], i, key)
            lines.append(f"| {c} | {label} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
        outs = {eng: {d for rnd in runs[eng] for d in rnd[i]["outputs"]} for eng in runs}
        if outs["tokenmill"] != outs["vllm"]:
            same = False
    verdict = ("greedy output identical between the engines at every level" if same else
               "WARNING: greedy outputs differ between the engines; the ratios compare different work")
    return "\n".join(lines) + "\n" + verdict, same


def plot_side_by_side(runs: dict[str, list[list[dict]]], levels: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = ((axes[0], ("output_tok_s",), "output tokens/s"), (axes[1], ("ttft_p50_ms", "ttft_p99_ms"), "TTFT (ms)"),
              (axes[2], ("itl_mean_ms",), "inter-token latency, mean (ms)"))
    for eng, color in (("tokenmill", "tab:blue"), ("vllm", "tab:orange")):
        for ax, keys, label in panels:
            for key, style in zip(keys, ("o-", "^:")):
                ax.plot(levels, [_mean_of(runs[eng], i, key) for i in range(len(levels))], style, color=color,
                        label=f"{eng} {key.split('_')[1] if len(keys) > 1 else ''}".strip())
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
