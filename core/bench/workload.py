"""Benchmark workloads: a seeded synthetic one, or a JSON file such as the shared workload W."""
from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass


@dataclass
class Workload:
    """Token-id prompts, the output length of each, and warm-up prompts (not timed)."""

    prompts: list[list[int]]
    max_tokens: int
    warm: list[list[int]]
    name: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def load_workload(path: str) -> Workload:
    """Read ``{"prompts": [[ids]], "max_tokens": N, "warm": [[ids]]}`` (the shared W format)."""
    with open(path) as f:
        data = json.load(f)
    return Workload([list(p) for p in data["prompts"]], int(data.get("max_tokens", 128)),
                    [list(p) for p in data.get("warm", [])], path)


def corpus_ids(tokenizer) -> list[int]:
    """Token ids of a fixed English text: the first 400k characters of the standard library's pydoc topics."""
    with open(sysconfig.get_paths()["stdlib"] + "/pydoc_data/topics.py", encoding="utf-8") as f:
        text = f.read()
    return tokenizer.encode(text[:400_000], add_special_tokens=False)


def synthetic_workload(tokenizer, num_prompts: int = 64, min_len: int = 32, max_len: int = 256,
                       max_tokens: int = 128, seed: int = 0) -> Workload:
    """Prompts sliced from the standard library's pydoc text, lengths uniform in [min_len, max_len]."""
    ids = corpus_ids(tokenizer)
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts, off = [], 0
    for _ in range(num_prompts):
        n = rng.randint(min_len, max_len) - len(bos)
        if off + n > len(ids):
            off = 0
        prompts.append(bos + ids[off:off + n])
        off += n
    warm = [bos + ids[-200:-160], bos + ids[-100:-60]]
    return Workload(prompts, max_tokens, warm, f"synthetic(n={num_prompts}, len={min_len}-{max_len}, seed={seed})")
