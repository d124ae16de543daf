"""The mask's cost (constrained vs unconstrained output tok/s) on two code trees, side by side.

    python scripts/structured_mask_before_after.py MODEL --before DIR [--concurrency 32] [--rounds 2]

``DIR`` holds an older tree's packages importable as ``tokenmill`` and ``tokenmill_cpu`` (say
``git archive OLD core plugins/cpu | tar -x -C X`` and ``X/path/tokenmill -> X/core``,
``X/path/tokenmill_cpu -> X/plugins/cpu/tokenmill_cpu``; ``--before X/path``). Each round runs one
process per tree, alternating, each measuring both modes the way ``tokenmill bench structured``
does (jump-forward off, a schema that cannot end, every token sampled under the mask); the
ratios are within a process, the best round of each tree is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(model: str, concurrency: list[int], output_len: int, reps: int) -> dict:
    import statistics

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.structured import ENDLESS, _prompts
    from tokenmill.guided import StructuredOutputsParams
    from tokenmill.guided.runtime import GuidedRuntime

    spent = [0.0]
    mask = GuidedRuntime.mask

    def timed_mask(*a, **k):  # the time a step spends filling and applying the bitmask
        t0 = time.perf_counter()
        try:
            return mask(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    GuidedRuntime.mask = timed_mask
    llm = LLM(model=model, device="cpu", max_num_seqs=max(concurrency), jump_forward=False)
    tok = llm.get_tokenizer()
    so = StructuredOutputsParams(json=ENDLESS, disable_any_whitespace=True)
    modes = {"unconstrained": SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
             "constrained": SamplingParams(temperature=0, max_tokens=output_len, structured_outputs=so)}
    llm.generate(_prompts(tok, 2, 99), list(modes.values()))
    out = {"op": llm.engine.runner.kernels.providers["apply_token_bitmask"]}
    for c in concurrency:
        prompts = [{"prompt_token_ids": p} for p in _prompts(tok, c, c)]
        tps: dict[str, list[float]] = {m: [] for m in modes}
        ratios, mask_ms, step_ms = [], [], []
        for rep in range(reps):  # the modes back to back, in alternating order: a ratio per pair
            pair = {}
            for name in (modes if rep % 2 == 0 else list(modes)[::-1]):
                spent[0], s0, t0 = 0.0, llm.stats().steps, time.perf_counter()
                outs = llm.generate(prompts, modes[name])
                dt = time.perf_counter() - t0
                pair[name] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
                tps[name].append(pair[name])
                if name == "constrained":
                    steps = llm.stats().steps - s0
                    mask_ms.append(spent[0] * 1e3 / steps)
                    step_ms.append(dt * 1e3 / steps)
            ratios.append(1 - pair["constrained"] / pair["unconstrained"])
        out[str(c)] = {"unconstrained": statistics.median(tps["unconstrained"]),
                       "constrained": statistics.median(tps["constrained"]), "cost": statistics.median(ratios),
                       "mask_ms": statistics.median(mask_ms), "step_ms": statistics.median(step_ms)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--before", required=True, help="directory put first on PYTHONPATH for the earlier tree")
    p.add_argument("--concurrency", default="32")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--rounds", type=int, default=1, help="processes per tree, alternating")
    p.add_argument("--reps", type=int, default=5, help="back-to-back pairs of runs per concurrency")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    if a.worker:
        print(json.dumps(worker(a.model, conc, a.output_len, a.reps)))
        return 0
    best: dict[str, list] = {}
    for rnd in range(a.rounds):
        for tree in ("before", "after") if rnd % 2 == 0 else ("after", "before"):
            env = dict(os.environ)
            if tree == "before":
                env["PYTHONPATH"] = a.before + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, __file__, a.model, "--before", a.before, "--concurrency", a.concurrency,
                   "--output-len", str(a.output_len), "--reps", str(a.reps), "--worker"]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"round {rnd} {tree:<6} op={res['op']}: " + "  ".join(
                f"c={c} {res[str(c)]['unconstrained']:.0f} vs {res[str(c)]['constrained']:.0f} tok/s "
                f"(cost {res[str(c)]['cost']:+.1%}, mask {res[str(c)]['mask_ms']:.2f} of {res[str(c)]['step_ms']:.1f} "
                f"ms/step)" for c in conc), flush=True)
            for c in conc:
                best.setdefault(f"{tree} c={c}", []).append({**res[str(c)], "op": res["op"]})
    print(f"\n{'tree':<8}{'c':>4}{'unconstrained tok/s':>21}{'constrained tok/s':>19}{'mask cost':>11}"
          f"{'mask ms/step':>14}{'step ms':>9}  op")
    for key, runs in best.items():
        tree, c = key.split(" c=")
        r = min(runs, key=lambda r: r["mask_ms"])
        print(f"{tree:<8}{c:>4}{r['unconstrained']:>21.0f}{r['constrained']:>19.0f}{r['cost']:>+11.1%}"
              f"{r['mask_ms']:>14.2f}{r['step_ms']:>9.1f}  {r['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
