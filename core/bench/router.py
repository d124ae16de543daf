"""``tokenmill bench router``: a multi-tenant chat workload against N replicas behind SGLang's router.

Many tenants, each with its own long system prompt, each running several multi-turn
conversations (every turn resends the whole history plus a new question and waits for the
answer); all conversations run at once, capped by ``--concurrency``, so the router has to trade
cache affinity against balance. The replicas start once; for each router setting (``--policies``,
plus ``--variants`` of the cache-aware thresholds) the replicas' prefix caches are flushed, the
router is started in front of them, the workload runs, and the router is stopped. Settings are
run in ``--rounds`` interleaved rounds (order reversed every other round) to even out a noisy box.

Reported per setting: the prefix-cache hit rate from the replicas' own ``/metrics`` (hit
tokens / looked-up tokens, summed over replicas), how the requests spread over replicas,
request and token throughput, and mean latency; with a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import sysconfig
import time
import urllib.request


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenmill.commands.router import add_router_arguments
    from tokenmill.commands.serve import add_arguments as add_serve_arguments

    add_serve_arguments(p)  # the replicas' options (model, engine flags) and the router's
    p.set_defaults(data_parallel_size=4, port=8500, kv_cache_memory=3 << 20, log_level="warning")
    b = p.add_argument_group("workload")
    b.add_argument("--policies", default="cache_aware,round_robin,random")
    b.add_argument("--variants", default="",
                   help="extra cache_aware settings, ';'-separated 'cache_threshold,balance_abs,balance_rel' "
                        "(e.g. '0.5,32,1.2;0.1,256,3')")
    b.add_argument("--tenants", type=int, default=16)
    b.add_argument("--conversations", type=int, default=2, help="conversations per tenant")
    b.add_argument("--turns", type=int, default=3)
    b.add_argument("--system-chars", type=int, default=1600, help="characters of each tenant's system prompt")
    b.add_argument("--question-chars", type=int, default=120)
    b.add_argument("--output-len", type=int, default=16)
    b.add_argument("--concurrency", type=int, default=16, help="conversations in flight at once")
    b.add_argument("--rounds", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--plot", default="bench_router.png", help="PNG of hit rate and throughput ('' to skip)")
    b.add_argument("--json-out", default=None)


def _text_source():
    with open(sysconfig.get_paths()["stdlib"] + "/pydoc_data/topics.py", encoding="utf-8") as f:
        return f.read()[:400_000]


def _workload(args) -> list[tuple[str, list[str]]]:
    """``[(system_prompt, [question per turn])]`` for every conversation, deterministic per seed."""
    text, rng = _text_source(), random.Random(args.seed)

    def take(n):
        start = rng.randrange(0, len(text) - n)
        return text[start:start + n]

    systems = [f"Tenant {t}. " + take(args.system_chars) for t in range(args.tenants)]
    convs = [(systems[t], [take(args.question_chars) for _ in range(args.turns)])
             for t in range(args.tenants) for _ in range(args.conversations)]
    rng.shuffle(convs)
    return convs


def _scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("tokenmill:") and " " in line:
                name, value = line.rsplit(" ", 1)
                name = name.split("{", 1)[0]
                out[name] = out.get(name, 0.0) + float(value)
    return out


def _flush(url: str) -> None:
    req = urllib.request.Request(url + "/flush_cache", method="POST")
    with urllib.request.urlopen(req, timeout=30):
        pass


async def _drive(url: str, model: str, convs, args) -> dict:
    import httpx

    sem = asyncio.Semaphore(args.concurrency)
    latencies, errors, tokens = [], [], {"prompt": 0, "completion": 0}

    async def conversation(client, system, questions):
        async with sem:
            messages = [{"role": "system", "content": system}]
            for q in questions:
                messages.append({"role": "user", "content": q})
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": model, "messages": messages, "max_tokens": args.output_len, "temperature": 0,
                    "ignore_eos": True})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                body = r.json()
                tokens["prompt"] += body["usage"]["prompt_tokens"]
                tokens["completion"] += body["usage"]["completion_tokens"]
                messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(client, s, qs) for s, qs in convs))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": len(latencies), "errors": errors, **tokens,
            "mean_latency_s": sum(latencies) / max(1, len(latencies))}


def _settings(args) -> list[dict]:
    out = [{"name": p, "policy": p} for p in args.policies.split(",") if p]
    for v in filter(None, args.variants.split(";")):
        ct, ab, rel = v.split(",")
        out.append({"name": f"cache_aware(ct={ct},abs={ab},rel={rel})", "policy": "cache_aware",
                    "cache_threshold": float(ct), "balance_abs_threshold": int(ab), "balance_rel_threshold": float(rel)})
    return out


def _run_setting(dep, setting: dict, convs, args) -> dict:
    for key in ("cache_threshold", "balance_abs_threshold", "balance_rel_threshold"):
        setattr(dep.args, key, setting.get(key, getattr(args, "_default_" + key)))
    dep.args.router_policy = setting["policy"]
    for url in dep.worker_urls:
        _flush(url)
    before = [_scrape(u) for u in dep.worker_urls]
    dep.start_router()
    try:
        res = asyncio.run(_drive(dep.url, "tokenmill-default" if args.model is None else
                                 (args.served_model_name or [args.model])[0], convs, args))
    finally:
        dep.stop_router()
    after = [_scrape(u) for u in dep.worker_urls]

    def delta(name):
        return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before)]

    hits, queries = delta("tokenmill:prefix_cache_hits_total"), delta("tokenmill:prefix_cache_queries_total")
    res.update(setting=setting["name"], hit_rate=sum(hits) / max(1.0, sum(queries)),
               per_replica_prompt_tokens=[int(x) for x in delta("tokenmill:prompt_tokens_total")],
               per_replica_hit_rate=[h / q if q else 0.0 for h, q in zip(hits, queries)],
               req_per_s=res["requests"] / res["wall_s"],
               tok_per_s=(res["prompt"] + res["completion"]) / res["wall_s"],
               out_tok_per_s=res["completion"] / res["wall_s"])
    return res


def _plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(names)), 4.2))
    a.bar(names, [100 * r["hit_rate"] for r in results], color="tab:blue")
    a.set_ylabel("prefix-cache hit rate (%)")
    b.bar(names, [r["tok_per_s"] for r in results], color="tab:green")
    b.set_ylabel("throughput (prompt+output tok/s)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    from tokenmill.commands.router import Deployment

    for key in ("cache_threshold", "balance_abs_threshold", "balance_rel_threshold"):
        setattr(args, "_default_" + key, getattr(args, key))
    convs = _workload(args)
    settings = _settings(args)
    print(f"bench router: {args.data_parallel_size} replicas, {args.tenants} tenants x {args.conversations} "
          f"conversations x {args.turns} turns ({len(convs) * args.turns} requests per setting), "
          f"concurrency {args.concurrency}", file=sys.stderr, flush=True)
    dep = Deployment(args)
    runs: dict[str, list[dict]] = {s["name"]: [] for s in settings}
    try:
        dep.start_replicas()
        for rnd in range(args.rounds):
            for s in (settings if rnd % 2 == 0 else settings[::-1]):
                r = _run_setting(dep, s, convs, args)
                runs[s["name"]].append(r)
                print(f"  round {rnd + 1} {s['name']:<40} hit rate {100 * r['hit_rate']:5.1f}%  "
                      f"{r['tok_per_s']:8.0f} tok/s  {r['req_per_s']:6.2f} req/s  errors {len(r['errors'])}  "
                      f"prompt tokens per replica {r['per_replica_prompt_tokens']}", file=sys.stderr, flush=True)
    finally:
        dep.stop()
    results = []
    for name, rs in runs.items():
        n = len(rs)
        results.append({"setting": name, "rounds": rs, **{k: sum(r[k] for r in rs) / n for k in (
            "hit_rate", "tok_per_s", "req_per_s", "out_tok_per_s", "mean_latency_s")},
            "errors": sum(len(r["errors"]) for r in rs)})
    base = next((r for r in results if r["setting"] == "round_robin"), None)
    print(f"\n{'setting':<40} {'hit rate':>9} {'tok/s':>9} {'req/s':>7} {'latency':>8}  vs round_robin")
    for r in results:
        vs = (f"hit x{r['hit_rate'] / base['hit_rate']:.2f}, tok/s x{r['tok_per_s'] / base['tok_per_s']:.2f}"
              if base and base["hit_rate"] > 0 else "")
        print(f"{r['setting']:<40} {100 * r['hit_rate']:8.1f}% {r['tok_per_s']:9.0f} {r['req_per_s']:7.2f} "
              f"{r['mean_latency_s']:7.2f}s  {vs}")
    if args.plot:
        _plot(results, args.plot, f"{args.data_parallel_size} replicas, {args.tenants} tenants, "
                                  f"{len(convs)} conversations x {args.turns} turns, concurrency {args.concurrency}")
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))},
                       "results": results}, f, indent=1)
    return 0 if all(r["errors"] == 0 for r in results) else 1
