"""``tokenmill bench router``: a multi-tenant chat workload against N replicas behind SGLang's router.

Many tenants, each with its own long system prompt, each with several users in multi-turn
conversations (every turn resends the whole history plus a new question). All conversations
are under way at once (``--active-conversations``) and ``--concurrency`` requests are in flight:
a freed request slot goes to a waiting conversation drawn at random, so between two turns of
one user other users' requests go by, as in production, and the router has to trade cache
affinity against balance. The replicas start once; for each router setting (``--policies``,
plus ``--variants`` of the cache-aware settings) the replicas' prefix caches are flushed, the
router is started in front of them, the workload runs, and the router is stopped. Settings are
run in ``--rounds`` interleaved rounds (order reversed every other round) to even out a noisy box.

Each replica's KV cache is ``--num-kv-blocks`` blocks (default 176): about 30% of all tenants'
system prompts at the default workload, so a replica cannot hold every tenant and which replica
a request lands on decides whether it hits (the header prints the share).

Reported per setting: the prefix-cache hit rate from the replicas' own ``/metrics`` (hit
tokens / looked-up tokens, summed over replicas), the ideal hit rate of the same prompts (one
unbounded cache that has seen every earlier prompt: what no router can beat), how the
requests spread over replicas, request and token throughput, and mean latency; with a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request

from tokenmill.bench.router_workload import drive, ideal_hit_rate, tokenize, workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenmill.commands.router import add_router_arguments
    from tokenmill.commands.serve import add_arguments as add_serve_arguments

    add_serve_arguments(p)  # the replicas' options (model, engine flags) and the router's
    p.set_defaults(data_parallel_size=4, port=8500, num_kv_blocks=176, log_level="warning")
    b = p.add_argument_group("workload")
    b.add_argument("--policies", default="cache_aware,round_robin,random")
    b.add_argument("--variants", default="",
                   help="extra cache_aware settings, ';'-separated, each 'key=value,...' over "
                        f"{', '.join(VARIANT_KEYS)} (e.g. 'cache_threshold=0.5;balance_abs_threshold=4')")
    b.add_argument("--tenants", type=int, default=32)
    b.add_argument("--conversations", type=int, default=2, help="conversations per tenant")
    b.add_argument("--turns", type=int, default=3)
    b.add_argument("--system-chars", type=int, default=1200, help="characters of each tenant's system prompt")
    b.add_argument("--question-chars", type=int, default=60)
    b.add_argument("--output-len", type=int, default=8)
    b.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    b.add_argument("--active-conversations", type=int, default=None,
                   help="conversations under way at once (default: all); a conversation's next turn waits "
                        "among theirs for a free request slot, taken in random order. Equal to --concurrency: "
                        "each conversation sends its turns back to back")
    b.add_argument("--rounds", type=int, default=1)
    b.add_argument("--request-timeout-s", type=float, default=600.0, help="client timeout of one request")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--plot", default="bench_router.png", help="PNG of hit rate and throughput ('' to skip)")
    b.add_argument("--json-out", default=None)


#: The cache-aware router settings ``--variants`` may change, with their types.
VARIANT_KEYS = {"cache_threshold": float, "balance_abs_threshold": int, "balance_rel_threshold": float,
                "eviction_interval_secs": int, "max_tree_size": int}


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


_SHORT = {"cache_threshold": "ct", "balance_abs_threshold": "abs", "balance_rel_threshold": "rel",
          "eviction_interval_secs": "evict", "max_tree_size": "tree"}


def parse_settings(policies: str, variants: str) -> list[dict]:
    """The router settings to compare: one per policy, plus each cache_aware variant."""
    out = []
    for p in filter(None, policies.split(",")):
        from tokenmill.commands.router import POLICIES

        if p not in POLICIES:
            raise ValueError(f"--policies: unknown policy {p!r} (one of {', '.join(POLICIES)})")
        out.append({"name": p, "policy": p})
    for v in filter(None, (x.strip() for x in variants.split(";"))):
        setting = {"policy": "cache_aware"}
        for item in filter(None, v.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in VARIANT_KEYS:
                raise ValueError(f"--variants: {item!r} is not key=value with key one of {', '.join(VARIANT_KEYS)}")
            try:
                setting[key] = VARIANT_KEYS[key](value)
            except ValueError:
                raise ValueError(f"--variants: {key} must be {VARIANT_KEYS[key].__name__}, got {value!r}") from None
        setting["name"] = "cache_aware(" + ",".join(f"{_SHORT[k]}={v}" for k, v in setting.items()
                                                    if k in VARIANT_KEYS) + ")"
        out.append(setting)
    if not out:
        raise ValueError("nothing to run: give --policies or --variants")
    return out


def _model_name(args) -> str:
    return "tokenmill-default" if args.model is None else (args.served_model_name or [args.model])[0]


def _run_setting(dep, setting: dict, convs, args) -> dict:
    for key in VARIANT_KEYS:
        setattr(dep.args, key, setting.get(key, getattr(args, "_default_" + key)))
    dep.args.router_policy = setting["policy"]
    for url in dep.worker_urls:
        _flush(url)
    before = [_scrape(u) for u in dep.worker_urls]
    dep.start_router()
    try:
        res = asyncio.run(drive(dep.url, _model_name(args), convs, args, setting["name"]))
    finally:
        dep.stop_router()
    after = [_scrape(u) for u in dep.worker_urls]

    def delta(name):
        return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before)]

    hits, queries = delta("tokenmill:prefix_cache_hits_total"), delta("tokenmill:prefix_cache_queries_total")
    sent = res.pop("sent")
    prompts = [tokenize(dep.worker_urls[0], _model_name(args), m) for m in sent]
    res.update(setting=setting["name"], hit_rate=sum(hits) / max(1.0, sum(queries)),
               ideal_hit_rate=ideal_hit_rate(prompts, args.block_size),
               computed_prompt_tokens=int(sum(queries) - sum(hits)),
               per_replica_requests=[int(x) for x in delta("tokenmill:request_success_total")],
               preemptions=int(sum(delta("tokenmill:num_preemptions_total"))),
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

    names = [r["setting"].replace("(", "\n(") for r in results]
    x = range(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(names)), 4.6))
    a.bar(x, [100 * r["hit_rate"] for r in results], color="tab:blue", label="measured (workers' /metrics)")
    a.scatter(x, [100 * r["ideal_hit_rate"] for r in results], color="black", marker="_", s=400, zorder=3,
              label="ideal (one unbounded cache)")
    a.set_ylabel("prefix-cache hit rate (%)")
    a.legend(fontsize=7, loc="upper right")
    a.set_ylim(0, 110)
    b.bar(x, [r["tok_per_s"] for r in results], color="tab:green")
    b.set_ylabel("throughput (prompt+output tok/s)")
    for ax in (a, b):
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    import textwrap

    fig.suptitle("\n".join(textwrap.fill(line, 130) for line in title.split("\n")), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _header(dep, convs, args) -> str:
    """Each replica's KV size against the tenants' system prompts: the regime the run is in."""
    model = _model_name(args)
    systems = {s for s, _ in convs}
    sys_tokens = sum(len(tokenize(dep.worker_urls[0], model, [{"role": "system", "content": s}])) for s in systems)
    with urllib.request.urlopen(dep.worker_urls[0] + "/get_server_info", timeout=10) as r:
        kv = json.load(r)["max_total_num_tokens"]
    share = (f"so one replica holds at most {100 * kv / max(1, sys_tokens):.0f}% of them" if kv < sys_tokens else
             "so every replica can hold all of them (round-robin hits once it has sent a tenant to each)")
    return (f"each replica's KV cache holds {kv} tokens; the {len(systems)} tenants' system prompts are "
            f"{sys_tokens} tokens ({sys_tokens // max(1, len(systems))} each), {share}")


def run(args) -> int:
    from tokenmill.commands.router import Deployment

    for key in VARIANT_KEYS:
        setattr(args, "_default_" + key, getattr(args, key))
    for key in ("tenants", "conversations", "turns", "concurrency", "rounds", "output_len", "system_chars",
                "question_chars", "active_conversations"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    settings = parse_settings(args.policies, args.variants)
    convs = workload(args)
    print(f"bench router: {args.data_parallel_size} replicas, {args.tenants} tenants x {args.conversations} "
          f"conversations x {args.turns} turns ({len(convs) * args.turns} requests per setting), "
          f"{args.active_conversations or len(convs)} conversations under way, {args.concurrency} requests in "
          f"flight, {len(settings)} setting(s) x {args.rounds} round(s)",
          file=sys.stderr, flush=True)
    dep = Deployment(args)
    runs: dict[str, list[dict]] = {s["name"]: [] for s in settings}
    try:
        dep.start_replicas()
        header = _header(dep, convs, args)
        print("bench router: " + header, file=sys.stderr, flush=True)
        t0, done, todo = time.perf_counter(), 0, len(settings) * args.rounds
        for rnd in range(args.rounds):
            for s in (settings if rnd % 2 == 0 else settings[::-1]):
                r = _run_setting(dep, s, convs, args)
                runs[s["name"]].append(r)
                done += 1
                left = (time.perf_counter() - t0) / done * (todo - done)
                print(f"  round {rnd + 1} {s['name']:<44} hit rate {100 * r['hit_rate']:5.1f}% "
                      f"(ideal {100 * r['ideal_hit_rate']:4.1f}%) {r['tok_per_s']:7.0f} tok/s "
                      f"{r['req_per_s']:6.2f} req/s  errors {len(r['errors'])}  preemptions {r['preemptions']}  "
                      f"requests per replica {r['per_replica_requests']}; {done}/{todo} runs, "
                      f"about {left / 60:.1f} min to go", file=sys.stderr, flush=True)
    finally:
        dep.stop()
    keys = ("hit_rate", "ideal_hit_rate", "tok_per_s", "req_per_s", "out_tok_per_s", "mean_latency_s",
            "computed_prompt_tokens")
    results = []
    for name, rs in runs.items():
        n = len(rs)
        results.append({"setting": name, "rounds": rs, **{k: sum(r[k] for r in rs) / n for k in keys},
                        "errors": sum(len(r["errors"]) for r in rs)})
    base = next((r for r in results if r["setting"] == "round_robin"), None)
    print(f"\n{header}")
    print(f"{'setting':<44} {'hit rate':>9} {'ideal':>6} {'computed':>9} {'tok/s':>7} {'req/s':>6} "
          f"{'latency':>8}  vs round_robin")
    for r in results:
        vs = (f"hit x{r['hit_rate'] / base['hit_rate']:.2f}, tok/s x{r['tok_per_s'] / base['tok_per_s']:.2f}"
              if base and base["hit_rate"] > 0 else "")
        print(f"{r['setting']:<44} {100 * r['hit_rate']:8.1f}% {100 * r['ideal_hit_rate']:5.1f}% "
              f"{r['computed_prompt_tokens']:9.0f} {r['tok_per_s']:7.0f} {r['req_per_s']:6.2f} "
              f"{r['mean_latency_s']:7.2f}s  {vs}")
    if args.plot:
        _plot(results, args.plot, f"{args.data_parallel_size} replicas, {args.tenants} tenants, "
                                  f"{len(convs)} conversations x {args.turns} turns "
                                  f"({args.active_conversations or len(convs)} under way at once), "
                                  f"{args.concurrency} requests in flight\n{header}")
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, type(None)))},
                       "header": header, "results": results}, f, indent=1)
    return 0 if all(r["errors"] == 0 for r in results) else 1
