"""``tokenmill bench structured``: what structured output costs and what jump-forward saves, in one run.

Three measurements on one model (offline engines in this process):

* **mask cost**: output tok/s of ``--min-requests`` (or ``c``) requests run ``c`` at a time (``--concurrency``, default 1, 8, 32),
  unconstrained and constrained by a JSON schema that cannot end within ``--output-len`` tokens
  (so both decode the same number of tokens; jump-forward off, so every token is sampled under
  the mask); the ratio is the cost of filling and applying the bitmask per step; and the share of
  the constrained run's wall time spent in the guided work itself (``GuidedRuntime.mask`` and
  ``advance``), which a busy host disturbs far less than it does a ratio of two runs;
* **compile time** per schema and backend: cold (first compile) and cached (the same spec again);
* **forward passes per request** with and without jump-forward on fixed-key JSON schemas
  (objects of 6 to 10 required keys with enum and integer values), greedy, one request at a
  time; also whether both decode to the same JSON value.

Prints a table, writes ``--json-out`` and a PNG (``--png``).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs

_WORDS = ("alpha beta gamma delta north south east west red green blue gold silver active idle open closed "
          "small large fast slow high low yes no").split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrent request counts")
    p.add_argument("--output-len", type=int, default=96, help="tokens per request in the mask-cost runs")
    p.add_argument("--min-requests", type=int, default=16, help="requests per measurement (c at a time)")
    p.add_argument("--rounds", type=int, default=3, help="batches of requests per concurrency and mode (best kept)")
    p.add_argument("--schemas", type=int, default=8, help="fixed-key schemas in the jump-forward runs")
    p.add_argument("--backends", default="xgrammar,outlines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--png", default="bench-structured.png")
    add_engine_arguments(p)


def fixed_key_schema(rng: random.Random) -> dict:
    """An object of 6 to 10 required keys, each an enum of words or a bounded integer."""
    keys = rng.sample(["status", "region", "tier", "level", "score", "color", "size", "speed", "state", "rank",
                       "zone", "grade", "mode", "kind"], rng.randint(6, 10))
    props = {}
    for k in keys:
        if rng.random() < 0.5:
            props[k] = {"enum": rng.sample(_WORDS, rng.randint(2, 4))}
        else:
            props[k] = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99])}
    return {"type": "object", "properties": props, "required": keys, "additionalProperties": False}


#: A schema whose output cannot end within a few hundred tokens: every request decodes the full length.
ENDLESS = {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "qty": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "qty", "ok"]}}

COMPILE_SCHEMAS = {
    "endless-array": ENDLESS,
    "nested-record": {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["street", "city"]}},
        "required": ["id", "name", "address"]},
}


def _engine(model, args, **over):
    from tokenmill import LLM

    kw = engine_kwargs(args)
    kw.update(over)
    return LLM(model=model, **kw)


def _prompts(tok, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [tok.encode("Record " + " ".join(rng.choice(_WORDS) for _ in range(12)) + ":") for _ in range(n)]


def _mask_cost(model, args, concurrency: list[int]) -> list[dict]:
    from tokenmill import SamplingParams
    from tokenmill.guided import StructuredOutputsParams

    rows = []
    llm = _engine(model, args, max_num_seqs=max(concurrency), jump_forward=False)
    tok = llm.get_tokenizer()
    so = StructuredOutputsParams(json=ENDLESS, disable_any_whitespace=True)
    modes = {"unconstrained": SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True),
             "constrained": SamplingParams(temperature=0, max_tokens=args.output_len, structured_outputs=so)}
    llm.generate(_prompts(tok, 2, 99), list(modes.values()))  # warm-up, compiles the grammar
    for c in concurrency:
        row = {"concurrency": c}
        for rnd in range(args.rounds):
            for name in (modes if rnd % 2 == 0 else list(modes)[::-1]):
                # at least --min-requests per measurement: c at a time, batch after batch
                prompts = [{"prompt_token_ids": p} for p in _prompts(tok, max(c, args.min_requests), args.seed + rnd)]
                rt = llm.engine.guided
                g0 = rt.mask_seconds + rt.advance_seconds
                n, t0 = 0, time.perf_counter()
                for i in range(0, len(prompts), c):
                    outs = llm.generate(prompts[i:i + c], modes[name])
                    n += sum(len(o.outputs[0].token_ids) for o in outs)
                dt = time.perf_counter() - t0
                row.setdefault(name, []).append(n / dt)
                if name == "constrained":  # the guided work's share of the same steps: robust to a busy host
                    row.setdefault("guided_share", []).append((rt.mask_seconds + rt.advance_seconds - g0) / dt)
        for name in modes:
            row[name] = max(row[name])  # best of the rounds: the least disturbed by the neighbours
        row["guided_share"] = min(row["guided_share"])
        row["mask_cost"] = 1 - row["constrained"] / row["unconstrained"]
        rows.append(row)
        print(f"  c={c:<3} unconstrained {row['unconstrained']:8.0f} tok/s  constrained {row['constrained']:8.0f} "
              f"tok/s  cost {row['mask_cost']:+.1%}  guided work {row['guided_share']:.1%} of the constrained run",
              file=sys.stderr, flush=True)
    return rows


def _compile_times(llm, backends: list[str], fixed: list[dict]) -> list[dict]:
    from tokenmill.guided import GuidedCompiler, GuidedSpec

    vocab = llm.engine.guided.vocab
    schemas = {**COMPILE_SCHEMAS, **{f"fixed-key-{i}": s for i, s in enumerate(fixed[:2])}}
    rows = []
    for backend in backends:
        compiler = GuidedCompiler(vocab, backend)
        compiler.backend(backend)  # the per-vocabulary set-up is once per engine, not per schema
        for name, schema in schemas.items():
            spec = GuidedSpec.json_schema(schema, any_whitespace=False)
            t0 = time.perf_counter()
            try:
                compiler.compile(spec)
            except ValueError as exc:
                rows.append({"backend": backend, "schema": name, "error": str(exc)[:80]})
                continue
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiler.compile(spec)
            cached = time.perf_counter() - t0
            rows.append({"backend": backend, "schema": name, "cold_ms": cold * 1e3, "cached_ms": cached * 1e3})
        compiler.close()
    return rows


def _jump_forward(model, args, backends: list[str], fixed: list[dict]) -> list[dict]:
    from tokenmill import SamplingParams
    from tokenmill.guided import StructuredOutputsParams

    rows = []
    engines = {jf: _engine(model, args, max_num_seqs=4, jump_forward=jf) for jf in (False, True)}
    tok = engines[False].get_tokenizer()
    for backend in backends:
        per = {False: [], True: []}
        same = 0
        for i, schema in enumerate(fixed):
            prompt = {"prompt_token_ids": _prompts(tok, 1, 1000 + i)[0]}
            so = StructuredOutputsParams(json=schema, disable_any_whitespace=True, backend=backend)
            params = SamplingParams(temperature=0, max_tokens=400, structured_outputs=so)
            values = {}
            for jf, llm in engines.items():
                steps0 = llm.stats().steps
                out = llm.generate(prompt, params)[0].outputs[0]
                per[jf].append(llm.stats().steps - steps0)
                try:
                    values[jf] = json.loads(out.text)
                except ValueError:
                    values[jf] = ("invalid", out.text)
            same += values[False] == values[True]
        off, on = sum(per[False]) / len(fixed), sum(per[True]) / len(fixed)
        rows.append({"backend": backend, "schemas": len(fixed), "passes_off": off, "passes_on": on,
                     "saved": 1 - on / off, "same_value": same})
        print(f"  {backend}: {off:.1f} -> {on:.1f} forward passes per request ({1 - on / off:.0%} fewer), "
              f"same value {same}/{len(fixed)}", file=sys.stderr, flush=True)
    return rows, engines[True]


def _plot(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    mc = res["mask_cost"]
    xs = range(len(mc))
    a.bar([x - 0.2 for x in xs], [r["unconstrained"] for r in mc], 0.4, label="unconstrained")
    a.bar([x + 0.2 for x in xs], [r["constrained"] for r in mc], 0.4, label="JSON schema")
    a.set_xticks(list(xs), [f"c={r['concurrency']}\n{r['mask_cost']:+.1%}\nguided {r['guided_share']:.1%}" for r in mc])
    a.set_ylabel("output tok/s")
    a.legend(fontsize=8)
    a.set_title("mask cost", fontsize=9)
    ok = [r for r in res["compile"] if "cold_ms" in r]
    names = [f"{r['backend']}\n{r['schema']}" for r in ok]
    b.barh(names, [r["cold_ms"] for r in ok], label="cold")
    b.barh(names, [r["cached_ms"] for r in ok], label="cached")
    b.set_xscale("log")
    b.set_xlabel("compile ms (log)")
    b.tick_params(axis="y", labelsize=6)
    b.legend(fontsize=8)
    jf = res["jump_forward"]
    xs = range(len(jf))
    c.bar([x - 0.2 for x in xs], [r["passes_off"] for r in jf], 0.4, label="jump-forward off")
    c.bar([x + 0.2 for x in xs], [r["passes_on"] for r in jf], 0.4, label="jump-forward on")
    c.set_xticks(list(xs), [f"{r['backend']}\n{r['saved']:.0%} fewer" for r in jf])
    c.set_ylabel("forward passes per request")
    c.legend(fontsize=8)
    c.set_title("fixed-key JSON schemas", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    from tokenmill.default_model import resolve_model

    model = resolve_model(args.model)
    concurrency = [int(x) for x in args.concurrency.split(",") if x]
    backends = [b for b in args.backends.split(",") if b]
    rng = random.Random(args.seed)
    fixed = [fixed_key_schema(rng) for _ in range(args.schemas)]
    print(f"bench structured: {model}", file=sys.stderr, flush=True)
    res = {"model": model, "mask_cost": _mask_cost(model, args, concurrency)}
    res["jump_forward"], llm = _jump_forward(model, args, backends, fixed)
    res["compile"] = _compile_times(llm, backends, fixed)

    print(f"\n{'concurrency':>11}{'unconstrained tok/s':>21}{'constrained tok/s':>19}{'mask cost':>11}"
          f"{'guided work':>13}")
    for r in res["mask_cost"]:
        print(f"{r['concurrency']:>11}{r['unconstrained']:>21,.0f}{r['constrained']:>19,.0f}{r['mask_cost']:>+11.1%}"
              f"{r['guided_share']:>13.1%}")
    print(f"\n{'backend':<10}{'schema':<16}{'cold ms':>10}{'cached ms':>11}")
    for r in res["compile"]:
        if "error" in r:
            print(f"{r['backend']:<10}{r['schema']:<16}  not compiled: {r['error']}")
        else:
            print(f"{r['backend']:<10}{r['schema']:<16}{r['cold_ms']:>10.1f}{r['cached_ms']:>11.3f}")
    print(f"\n{'backend':<10}{'passes off':>11}{'passes on':>11}{'fewer':>8}{'same value':>12}")
    for r in res["jump_forward"]:
        print(f"{r['backend']:<10}{r['passes_off']:>11.1f}{r['passes_on']:>11.1f}{r['saved']:>8.0%}"
              f"{r['same_value']:>8}/{r['schemas']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    if args.png:
        _plot(res, args.png, f"bench structured: {model}")
        print(f"\nplot: {args.png}")
    return 0
