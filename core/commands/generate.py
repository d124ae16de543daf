"""``tokenmill generate [PATH] --prompt TEXT``: offline generation from the command line."""
from __future__ import annotations

import argparse
import json

from tokenmill.commands.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="local checkpoint directory (default: the bundled model)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="treat each prompt as a user message and apply the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, dest="sample_seed")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    add_engine_arguments(p)


def run(args) -> int:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=args.model, **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed, n=args.n, logprobs=args.logprobs,
                            stop=args.stop)
    if args.chat:
        outs = [llm.chat([{"role": "user", "content": p}], params)[0] for p in args.prompt]
    else:
        outs = llm.generate(args.prompt, params)
    if args.json:
        print(json.dumps([{"prompt": o.prompt, "outputs": [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            for c in o.outputs]} for o in outs], indent=2))
        return 0
    for o in outs:
        for c in o.outputs:
            print(f"--- prompt: {o.prompt!r} [{c.index}] finish={c.finish_reason}")
            print(c.text)
    return 0
