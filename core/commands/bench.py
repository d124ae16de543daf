"""``tokenmill bench {throughput,prefix,serve,structured,router}``: side-by-side benchmarks in one run."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "throughput": "offline generation throughput on a seeded workload (or --workload W.json), optionally vs HF",
    "prefix": "shared-prefix workloads with prefix caching on and off",
    "serve": "drive a running server with concurrent streaming clients",
    "structured": "structured output: mask cost at 1/8/32 concurrent, compile time, jump-forward forward passes",
    "profile": "where decode and prefill steps spend their time (linears with GFLOP/s, attention, ops, sampling)",
    "router": "multi-tenant chat against N replicas behind SGLang's router, per routing policy",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_text in BENCHES.items():
        bp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"tokenmill.bench.{name}").add_arguments(bp)


def run(args) -> int:
    return importlib.import_module(f"tokenmill.bench.{args.bench}").run(args)
