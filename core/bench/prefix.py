"""``tokenmill bench prefix``: shared-prefix workloads with prefix caching on and off, side by side.

Three workloads, each run twice on fresh engines (caching on, caching off) in one process:

* ``system-prompt``: one long system prompt followed by many different short questions;
* ``multi-turn``: conversations whose every turn resends the whole history plus a new question;
* ``branching``: a few long trunks, each continued by several different branches.

Reported per workload and mode: prompt tokens submitted, prompt tokens actually computed,
wall time, total throughput (prompt + output tokens/s) and the on/off ratios.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import time

from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: bundled model)")
    p.add_argument("--workloads", default="system-prompt,multi-turn,branching")
    p.add_argument("--system-len", type=int, default=512, help="tokens in the shared system prompt")
    p.add_argument("--num-questions", type=int, default=64)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--trunks", type=int, default=4)
    p.add_argument("--branches", type=int, default=8)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    add_engine_arguments(p)


class _Text:
    """Token ids sliced from the standard library's pydoc text, deterministic per seed."""

    def __init__(self, tokenizer, seed: int):
        with open(sysconfig.get_paths()["stdlib"] + "/pydoc_data/topics.py", encoding="utf-8") as f:
            self.ids = tokenizer.encode(f.read()[:300_000], add_special_tokens=False)
        self.rng = random.Random(seed)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def take(self, n: int) -> list[int]:
        start = self.rng.randrange(0, len(self.ids) - n)
        return self.ids[start:start + n]


def _system_prompt(llm, text: _Text, args):
    system = text.bos + text.take(args.system_len)
    prompts = [system + text.take(text.rng.randint(8, 32)) for _ in range(args.num_questions)]
    return [_run(llm, prompts, args)]


def _multi_turn(llm, text: _Text, args):
    histories = [text.bos + text.take(text.rng.randint(64, 160)) for _ in range(args.conversations)]
    results = []
    for _ in range(args.turns):  # every turn resends the history; answers are appended as generated
        histories = [h + text.take(text.rng.randint(8, 24)) for h in histories]
        res = _run(llm, histories, args, return_outputs=True)
        histories = [h + out for h, out in zip(histories, res.pop("outputs"))]
        results.append(res)
    return results


def _branching(llm, text: _Text, args):
    prompts = []
    for _ in range(args.trunks):
        trunk = text.bos + text.take(256)
        prompts += [trunk + text.take(text.rng.randint(16, 48)) for _ in range(args.branches)]
    return [_run(llm, prompts, args)]


WORKLOADS = {"system-prompt": _system_prompt, "multi-turn": _multi_turn, "branching": _branching}


def _run(llm, prompts, args, return_outputs=False) -> dict:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    before = llm.stats().prompt_tokens_computed
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - t0
    res = {"prompt_tokens": sum(len(p) for p in prompts),
           "computed_prompt_tokens": llm.stats().prompt_tokens_computed - before,
           "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": seconds,
           "first_tokens": [o.outputs[0].token_ids[:4] for o in outs[:4]]}
    if return_outputs:
        res["outputs"] = [o.outputs[0].token_ids for o in outs]
    return res


def _total(parts: list[dict]) -> dict:
    keys = ("prompt_tokens", "computed_prompt_tokens", "output_tokens", "seconds")
    total = {k: sum(p[k] for p in parts) for k in keys}
    total["tok_s"] = (total["prompt_tokens"] + total["output_tokens"]) / total["seconds"]
    total["first_tokens"] = parts[-1]["first_tokens"]
    return total


def run(args) -> int:
    from tokenmill import LLM
    from tokenmill.default_model import resolve_model

    model = resolve_model(args.model)
    kwargs = engine_kwargs(args)
    results = {}
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        for caching in (True, False):
            kwargs["enable_prefix_caching"] = caching
            llm = LLM(model=model, **kwargs)
            tok = llm.get_tokenizer()
            print(f"{name}: caching {'on' if caching else 'off'} ...", file=sys.stderr, flush=True)
            results[(name, caching)] = _total(WORKLOADS[name](llm, _Text(tok, args.seed), args))
            del llm
    print(f"\n{'workload':<15}{'caching':>8}{'prompt tok':>12}{'computed':>10}{'seconds':>9}{'tok/s':>9}")
    summary = []
    for name in args.workloads.split(","):
        on, off = results[(name, True)], results[(name, False)]
        for label, r in (("on", on), ("off", off)):
            print(f"{name:<15}{label:>8}{r['prompt_tokens']:>12,}{r['computed_prompt_tokens']:>10,}"
                  f"{r['seconds']:>9.2f}{r['tok_s']:>9,.0f}")
        ratio_c = off["computed_prompt_tokens"] / max(1, on["computed_prompt_tokens"])
        speed = on["tok_s"] / off["tok_s"]
        same = on["first_tokens"] == off["first_tokens"]
        print(f"{'':<15}{'ratio':>8}  computes {ratio_c:.1f}x fewer prompt tokens, {speed:.2f}x throughput"
              f"{'' if same else '  (OUTPUTS DIFFER)'}")
        summary.append({"workload": name, "on": on, "off": off, "computed_ratio": ratio_c, "speedup": speed,
                        "same_outputs": same})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
