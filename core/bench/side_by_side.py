"""``tokenmill bench serve --against-vllm PYTHON|URL``: tokenmill and vLLM-CPU side by side in one run.

With ``--launch MODEL``, the same concurrency levels run against vLLM-CPU's OpenAI server,
started from that environment's interpreter on the same checkpoint (or the URL is used as
is). The engines take turns (``--pairs N`` rounds, one server up at a time so they never
share the cores), and the table gives each figure per round with the tokenmill/vLLM ratio;
the plot draws both engines. The greedy text each engine returned at each level is
compared, so a ratio is only quoted for the same work.
"""
from __future__ import annotations

import json
import os
import sys

from tokenmill.bench import vllm_peer
from tokenmill.bench.serve import auth_headers, launch_server, mean, measure, prompt_text, stop_server


def _vllm_model_path(args) -> str:
    if args.launch == "default":
        from tokenmill.default_model import DEFAULT_MODEL_DIR

        return str(DEFAULT_MODEL_DIR)
    return os.path.abspath(args.launch)


def run_side_by_side(args, levels: list[int]) -> int:
    """tokenmill and vLLM in turns, ``--pairs`` rounds, then one table of per-round figures and ratios."""
    if not args.launch:
        raise ValueError("--against-vllm needs --launch MODEL: both engines serve the same checkpoint")
    prompt = prompt_text(args)
    headers = auth_headers(args)
    runs: dict[str, list[list[dict]]] = {"tokenmill": [], "vllm": []}
    for k in range(args.pairs):
        print(f"round {k + 1}/{args.pairs}: tokenmill", file=sys.stderr, flush=True)
        proc, base = launch_server(args)
        try:
            _, res = measure(base, headers, None, prompt, levels, args)
        finally:
            stop_server(proc)
        runs["tokenmill"].append(res)
        print(f"round {k + 1}/{args.pairs}: vLLM", file=sys.stderr, flush=True)
        with vllm_peer.vllm_server(args.against_vllm, _vllm_model_path(args), args.dtype) as vbase:
            _, res = measure(vbase, headers, vllm_peer.served_model_name(vbase), prompt, levels, args)
        runs["vllm"].append(res)
    table, same = side_by_side_table(runs, levels)
    print(f"\n{args.num_requests} streaming requests per level, max_tokens {args.max_tokens}, "
          f"{args.pairs} round(s), servers in turns")
    print(table)
    if args.plot:
        plot_side_by_side(runs, levels, args.plot, f"{os.path.basename(_vllm_model_path(args))}: tokenmill vs vLLM")
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
