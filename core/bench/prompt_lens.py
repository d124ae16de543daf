"""``tokenmill bench serve --launch MODEL --prompt-lens 128,256,...``: TTFT and ITL against prompt length.

Prompts of exactly N tokens of the model's own tokenizer are cut from a fixed English text
(:func:`tokenmill.bench.workload.corpus_ids`) at successive offsets and sent as token ids, so
every engine gets the same tokens and no re-tokenization changes a length. Every request of a
run, the untimed warm-ups before each case included, has its own prompt, and no two prompts share their first
:data:`KEY_TOKENS` tokens: the prefix cache (on by default in tokenmill and in vLLM) can then
never serve one request's blocks from another's, and the servers' own prefix-cache hit counters,
read before and after, are reported to show it. At each length every ``--concurrency`` level
sends ``--num-requests`` requests. With ``--against-vllm`` the same cases run against vLLM
(:mod:`tokenmill.bench.side_by_side`) and the table gives tokenmill/vLLM ratios.
"""
from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

from tokenmill.bench.serve import _level, mean, request_body, served_model

#: Prompts of a run differ within this many leading tokens, so no KV block is shared between them.
KEY_TOKENS = 8
MAX_LENGTHS = 32
ENGINE_NAMES = {"tokenmill": "tokenmill", "vllm": "vLLM"}


def parse_lengths(spec: str, max_tokens: int, max_context: int) -> list[int]:
    """``--prompt-lens``: distinct lengths of at least :data:`KEY_TOKENS`, each leaving room for ``max_tokens``."""
    try:
        lens = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-lens must be comma-separated integers, got {spec!r}") from None
    if not 1 <= len(lens) <= MAX_LENGTHS:
        raise ValueError(f"--prompt-lens takes 1 to {MAX_LENGTHS} lengths, got {len(lens)}")
    if len(set(lens)) != len(lens):
        raise ValueError(f"--prompt-lens repeats a length: {spec!r}")
    if min(lens) < KEY_TOKENS:
        raise ValueError(f"--prompt-lens: lengths must be at least {KEY_TOKENS} tokens, got {min(lens)}")
    too_long = [n for n in lens if n + max_tokens > max_context]
    if too_long:
        raise ValueError(f"--prompt-lens {too_long} with --max-tokens {max_tokens} exceed the {max_context}-token "
                         f"context; the longest prompt that fits is {max_context - max_tokens} tokens")
    return lens


class PromptSource:
    """Prompts of an exact token length: an optional BOS and then a window of ``ids``, the windows starting
    ``stride`` tokens apart (moving on past any start whose first :data:`KEY_TOKENS` tokens were handed out)."""

    def __init__(self, ids: list[int], bos: int | None, stride: int = 61):
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.ids, self.bos, self.stride = list(ids), [] if bos is None else [bos], stride
        self._next = 0
        self._keys: set[tuple[int, ...]] = set()

    def take(self, length: int) -> list[int]:
        n = length - len(self.bos)
        starts = len(self.ids) - n + 1
        if n < 1 or starts < 1:
            raise ValueError(f"the corpus has {len(self.ids)} tokens, too few for a {length}-token prompt")
        for _ in range(starts):
            off = self._next % starts
            self._next = off + 1
            prompt = self.bos + self.ids[off:off + n]
            key = tuple(prompt[:KEY_TOKENS])
            if key not in self._keys:
                self._keys.add(key)
                self._next = off + self.stride
                return prompt
        raise ValueError(f"the corpus has no {length}-token window left whose start no other prompt shares")


def build_cases(source: PromptSource, lengths: list[int], levels: list[int], num_requests: int) -> list[dict]:
    """One case per (length, concurrency): its own ``concurrency`` warm-up prompts and ``num_requests`` prompts."""
    return [{"prompt_len": n, "concurrency": c, "warm": [source.take(n) for _ in range(c)],
             "prompts": [source.take(n) for _ in range(num_requests)]} for n in lengths for c in levels]


def max_context(model_dir: str, against_vllm: str | None) -> int:
    """The longest sequence both servers take: the checkpoint's positions (and vLLM's ``--max-model-len``)."""
    from tokenmill.bench import vllm_peer

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    limit = int(cfg.get("max_position_embeddings") or 2048)
    if against_vllm and not vllm_peer.is_url(against_vllm):
        limit = min(limit, vllm_peer.SERVER_MAX_MODEL_LEN)
    return limit


def cases_for(args, levels: list[int]) -> list[dict]:
    """The run's cases from ``--prompt-lens``, cut with the ``--launch`` checkpoint's tokenizer."""
    if not args.launch:
        raise ValueError("--prompt-lens needs --launch MODEL: prompts are cut with that checkpoint's tokenizer")
    from transformers import AutoTokenizer

    from tokenmill.bench.serve import launched_checkpoint
    from tokenmill.bench.workload import corpus_ids

    model_dir = launched_checkpoint(args)
    lengths = parse_lengths(args.prompt_lens, args.max_tokens, max_context(model_dir, args.against_vllm))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return build_cases(PromptSource(corpus_ids(tok), tok.bos_token_id), lengths, levels, args.num_requests)


def prefix_cache_counters(base: str) -> tuple[float, float] | None:
    """(hit, looked-up) prompt tokens from a tokenmill or vLLM ``/metrics``; None if it has none."""
    names = {"tokenmill:prefix_cache_hits_total": 0, "vllm:prefix_cache_hits_total": 0,
             "tokenmill:prefix_cache_queries_total": 1, "vllm:prefix_cache_queries_total": 1}
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    found, seen = [0.0, 0.0], False
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        slot = names.get(name.split("{", 1)[0])
        if slot is not None:
            found[slot] += float(value)
            seen = True
    return (found[0], found[1]) if seen else None


def measure_cases(base: str, headers: dict, model: str | None, cases: list[dict], args) -> tuple[list[dict], dict]:
    """Every case against one server: one result per case (with ``prompt_len``), and its prefix-cache use."""
    model = served_model(base, headers, model)
    before = prefix_cache_counters(base)
    results = []
    for case in cases:
        n, c = case["prompt_len"], case["concurrency"]
        print(f"prompt {n} tokens, concurrency {c}: {len(case['prompts'])} requests ...", file=sys.stderr, flush=True)
        bodies = [request_body(model, p, args) for p in case["prompts"]]
        # as many untimed requests at once as the level runs: every batch size it will decode has run before
        warm = [{**request_body(model, p, args), "max_tokens": min(8, args.max_tokens)} for p in case["warm"]]
        r = asyncio.run(_level(base, headers, bodies, warm, c, args.timeout))
        r["prompt_len"] = n
        results.append(r)
        print(f"  TTFT p50 {r['ttft_p50_ms']:.1f} ms, p99 {r['ttft_p99_ms']:.1f} ms, ITL mean {r['itl_mean_ms']:.2f} ms, "
              f"{r['failed']} failed {r['errors'] or ''}", file=sys.stderr, flush=True)
    after = prefix_cache_counters(base)
    cache = ({"hit_tokens": after[0] - before[0], "queried_tokens": after[1] - before[1]}
             if before is not None and after is not None else {})
    return results, cache


METRICS = (("ttft_p50_ms", "TTFT p50 ms", "{:,.0f}"), ("ttft_p99_ms", "TTFT p99 ms", "{:,.0f}"),
           ("itl_mean_ms", "ITL mean ms", "{:.1f}"))


def _avg(rounds: list[list[dict]], i: int, key: str) -> float:
    return mean([rnd[i][key] for rnd in rounds])


def length_table(runs: dict[str, list[list[dict]]]) -> tuple[str, bool]:
    """A markdown table, one row per (prompt length, concurrency): each engine's TTFT p50 / p99 and mean ITL (every
    round's figure), and with two engines the tokenmill/vLLM ratio of the means. Also whether every case's greedy
    completions were the same set for all engines."""
    engines = list(runs)
    pair = engines == ["tokenmill", "vllm"]
    head = ["prompt tokens", "conc"]
    for _, label, _ in METRICS:
        head += [f"{label} {ENGINE_NAMES.get(e, e)}" for e in engines] + (["ratio"] if pair else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    same = True
    for i, case in enumerate(runs[engines[0]][0]):
        row = [str(case["prompt_len"]), str(case["concurrency"])]
        for key, _, fmt in METRICS:
            row += [" / ".join(fmt.format(rnd[i][key]) for rnd in runs[e]) for e in engines]
            if pair:
                row.append(f"{_avg(runs['tokenmill'], i, key) / _avg(runs['vllm'], i, key):.2f}x")
        lines.append("| " + " | ".join(row) + " |")
        outs = [{d for rnd in runs[e] for d in rnd[i]["outputs"]} for e in engines]
        same = same and all(o == outs[0] for o in outs)
    if len(engines) > 1:
        lines.append("greedy output identical between the engines at every length and level" if same else
                     "WARNING: greedy outputs differ between the engines; the ratios compare different work")
    return "\n".join(lines), same


def plot_lengths(runs: dict[str, list[list[dict]]], path: str, title: str) -> None:
    """TTFT p50, TTFT p99 and mean ITL against prompt length: a line per engine and concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4.2))
    cases = runs[next(iter(runs))][0]
    levels = list(dict.fromkeys(c["concurrency"] for c in cases))
    for e, color in zip(runs, ("tab:blue", "tab:orange", "tab:green")):
        for c, style in zip(levels, ("o-", "s--", "^:", "d-.")):
            idx = [i for i, case in enumerate(cases) if case["concurrency"] == c]
            xs = [cases[i]["prompt_len"] for i in idx]
            for ax, (key, label, _) in zip(axes, METRICS):
                ax.plot(xs, [_avg(runs[e], i, key) for i in idx], style, color=color,
                        label=f"{ENGINE_NAMES.get(e, e)} c={c}")
                ax.set_ylabel(label.replace(" ms", " (ms)"))
    for ax in axes:
        ax.set_xlabel("prompt tokens")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def limit_lines(shapes, gflops: float, method: str, runs: dict[str, list[list[dict]]]) -> list[str]:
    """At concurrency 1 (no queueing), each engine's TTFT p50 against the prompt's matmuls at ``gflops``."""
    from tokenmill.bench.limits import prefill_seconds

    cases = runs[next(iter(runs))][0]
    out = [f"prefill against the matmul limit ({gflops:,.0f} GFLOP/s through {method}, measured before the servers "
           f"started, best of 5 windows; {shapes.flops_per_token(lm_head=False) / 1e6:.1f} MFLOP per prompt token, "
           f"attention not counted), concurrency 1:"]
    for i, case in enumerate(cases):
        if case["concurrency"] != 1:
            continue
        limit_ms = 1e3 * prefill_seconds(shapes, case["prompt_len"], gflops)
        shares = ", ".join(f"{ENGINE_NAMES.get(e, e)} TTFT p50 {_avg(runs[e], i, 'ttft_p50_ms'):,.0f} ms = "
                           f"{limit_ms / _avg(runs[e], i, 'ttft_p50_ms'):.0%} of it" for e in runs)
        out.append(f"  {case['prompt_len']:>5} tokens: limit {limit_ms:,.1f} ms; {shares}")
    return out


def matmul_limit(model_dir: str, dtype: str):
    """(shapes, GFLOP/s, method name) of the checkpoint on this machine, or None for a non-Llama checkpoint."""
    from tokenmill.bench.limits import ModelShapes, engine_gemm_gflops

    try:
        shapes = ModelShapes.from_checkpoint(model_dir)
    except (OSError, KeyError, ValueError):
        return None
    print("measuring the matmul limit ...", file=sys.stderr, flush=True)
    return (shapes, *engine_gemm_gflops(shapes, "float32" if dtype == "auto" else dtype, seconds=0.5, windows=5))


def report(args, runs: dict[str, list[list[dict]]], caches: dict[str, list[dict]], limit, extra: list[str]) -> bool:
    """Print the table, cache use, limit shares and ``extra`` lines; write the plot and JSON. Returns output agreement."""
    from tokenmill.bench.serve import launched_checkpoint

    table, same = length_table(runs)
    first = runs[next(iter(runs))][0]
    print(f"\n{first[0]['requests']} streaming requests per case (each its own prompt), "
          f"max_tokens {args.max_tokens}, {len(next(iter(runs.values())))} round(s)")
    print(table)
    for e, rounds in caches.items():
        cells = [f"{c['hit_tokens']:,.0f} of {c['queried_tokens']:,.0f}" if c else "not reported" for c in rounds]
        print(f"prefix-cache hit tokens during the sweep, {ENGINE_NAMES.get(e, e)}: {' / '.join(cells)}")
    if limit is not None:
        print("\n".join(limit_lines(*limit, runs)))
    for line in extra:
        print(line)
    name = Path(launched_checkpoint(args)).name
    if args.plot:
        plot_lengths(runs, args.plot, f"{name}: TTFT and ITL against prompt length, {args.max_tokens} output tokens")
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runs": runs, "prefix_cache": caches}, f, indent=2)
    return same


def run_alone(args, cases: list[dict]) -> int:
    """The sweep against one launched tokenmill server."""
    from tokenmill.bench.serve import auth_headers, launch_server, launched_checkpoint, stop_server

    limit = matmul_limit(launched_checkpoint(args), args.dtype)
    proc, base = launch_server(args)
    try:
        results, cache = measure_cases(base, auth_headers(args), args.model, cases, args)
    finally:
        stop_server(proc)
    report(args, {"tokenmill": [results]}, {"tokenmill": [cache]}, limit, [])
    return 1 if any(r["failed"] for r in results) else 0
