"""The mask's cost per step, an earlier mask path against today's, side by side in one process.

    python scripts/structured_mask_before_after.py MODEL --before TREE [--concurrency 1,8,32]

``TREE`` is an earlier checkout's ``core/`` (say ``git archive OLD core | tar -x -C X``, then
``--before X/core``): its ``guided/runtime.py`` ``GuidedRuntime.mask`` and its reference
``apply_token_bitmask`` are loaded from there and run in the same engine as today's mask and
registered op. Three modes share one engine and the same prompts: unconstrained, constrained
with the earlier path, constrained with today's (jump-forward off, a schema that cannot end
within ``--output-len``, so every token is sampled under the mask, as ``tokenmill bench
structured`` measures). Per concurrency, ``--reps`` rounds run the modes back to back in
rotating order; medians of tok/s, of the per-round cost ratios and of the milliseconds per step
spent in ``mask`` are printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--before", required=True, help="an earlier tree's core/ directory")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.structured import ENDLESS, _prompts
    from tokenmill.guided import StructuredOutputsParams
    from tokenmill.guided.runtime import GuidedRuntime

    old_runtime = _load(Path(a.before) / "guided" / "runtime.py", "before_runtime")
    old_reference = _load(Path(a.before) / "ops" / "reference.py", "before_reference")
    conc = [int(x) for x in a.concurrency.split(",")]
    llm = LLM(model=a.model, device="cpu", max_num_seqs=max(conc), jump_forward=False)
    runtime, kernels = llm.engine.guided, llm.engine.runner.kernels
    new_op = kernels.apply_token_bitmask
    paths = {"before": (old_runtime.GuidedRuntime.mask, old_reference.apply_token_bitmask),
             "after": (GuidedRuntime.mask, new_op)}
    spent = [0.0]
    use = {"fn": None}

    def timed_mask(*args):
        t0 = time.perf_counter()
        try:
            return use["fn"](*args)
        finally:
            spent[0] += time.perf_counter() - t0

    runtime.mask = lambda logits, rows, seqs, _op: timed_mask(runtime, logits, rows, seqs, use["op"])
    tok = llm.get_tokenizer()
    so = StructuredOutputsParams(json=ENDLESS, disable_any_whitespace=True)
    free = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=a.output_len, structured_outputs=so)
    modes = ["unconstrained", "before", "after"]
    print(f"model {a.model}; today's op: {kernels.providers['apply_token_bitmask']}; earlier path from {a.before}",
          flush=True)
    for path in ("before", "after"):  # warm both
        use["fn"], use["op"] = paths[path]
        llm.generate(_prompts(tok, 2, 99), [free, constrained])
    print(f"\n{'c':>3}{'unconstrained tok/s':>21}{'before tok/s':>14}{'after tok/s':>13}{'cost before':>13}"
          f"{'cost after':>12}{'mask ms/step before':>21}{'after':>7}{'step ms':>9}")
    for c in conc:
        prompts = [{"prompt_token_ids": x} for x in _prompts(tok, c, c)]
        tps = {m: [] for m in modes}
        cost = {"before": [], "after": []}
        mask_ms = {"before": [], "after": []}
        step_ms = []
        for rep in range(a.reps):
            got = {}
            for m in modes[rep % 3:] + modes[:rep % 3]:
                if m != "unconstrained":
                    use["fn"], use["op"] = paths[m]
                spent[0], s0, t0 = 0.0, llm.stats().steps, time.perf_counter()
                outs = llm.generate(prompts, free if m == "unconstrained" else constrained)
                dt = time.perf_counter() - t0
                steps = llm.stats().steps - s0
                got[m] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
                tps[m].append(got[m])
                if m == "unconstrained":
                    step_ms.append(dt * 1e3 / steps)
                else:
                    mask_ms[m].append(spent[0] * 1e3 / steps)
            for m in cost:
                cost[m].append(1 - got[m] / got["unconstrained"])
        med = statistics.median
        print(f"{c:>3}{med(tps['unconstrained']):>21.0f}{med(tps['before']):>14.0f}{med(tps['after']):>13.0f}"
              f"{med(cost['before']):>+13.1%}{med(cost['after']):>+12.1%}{med(mask_ms['before']):>21.2f}"
              f"{med(mask_ms['after']):>7.2f}{med(step_ms):>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
