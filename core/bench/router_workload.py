"""The client side of ``tokenmill bench router``: the multi-tenant chat workload and what drives it.

:func:`workload` builds the conversations (deterministic per seed), :func:`drive` sends them with
``--concurrency`` requests in flight and ``--active-conversations`` under way, a freed request
slot going to a waiting conversation drawn at random (:class:`RandomGate`), and
:func:`ideal_hit_rate` is the hit rate of one unbounded cache over the prompts that were sent.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import sysconfig
import time
import urllib.request


def _text_source():
    with open(sysconfig.get_paths()["stdlib"] + "/pydoc_data/topics.py", encoding="utf-8") as f:
        return f.read()[:400_000]


def workload(args) -> list[tuple[str, list[str]]]:
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


class RandomGate:
    """At most ``n`` holders at once; a freed place goes to a waiter drawn at random.

    Users mid-conversation send their next turns in no fixed order: a FIFO would cycle
    through the conversations, which is the one access order that an LRU cache never hits.
    """

    def __init__(self, n: int, rng: random.Random):
        self.free, self.rng, self.waiters = n, rng, []

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        await fut  # the releaser hands its place over: ``free`` stays as it is

    def release(self) -> None:
        while self.waiters:
            fut = self.waiters.pop(self.rng.randrange(len(self.waiters)))
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


async def drive(url: str, model: str, convs, args, label: str, transport=None) -> dict:
    import httpx

    rng = random.Random(args.seed)
    requests_gate = RandomGate(args.concurrency, rng)
    conversations_gate = RandomGate(args.active_conversations or len(convs), rng)
    latencies, errors, tokens = [], [], {"prompt": 0, "completion": 0}
    sent: list[list[dict]] = []  # every request's messages, in the order they were sent
    total = len(convs) * args.turns

    async def conversation(client, system, questions):
        await conversations_gate.acquire()
        try:
            messages = [{"role": "system", "content": system}]
            for q in questions:
                messages.append({"role": "user", "content": q})
                await requests_gate.acquire()
                try:
                    sent.append(list(messages))
                    t0 = time.perf_counter()
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": model, "messages": messages, "max_tokens": args.output_len, "temperature": 0,
                        "ignore_eos": True})
                    latencies.append(time.perf_counter() - t0)
                finally:
                    requests_gate.release()
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                body = r.json()
                tokens["prompt"] += body["usage"]["prompt_tokens"]
                tokens["completion"] += body["usage"]["completion_tokens"]
                messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        finally:
            conversations_gate.release()

    async def progress(t0):
        while True:
            await asyncio.sleep(15)
            done, took = len(latencies), time.perf_counter() - t0
            eta = f", about {took / done * (total - done):.0f} s to go" if done else ""
            print(f"    {label}: {done}/{total} requests, {took:.0f} s{eta}", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits, transport=transport) as client:
        t0 = time.perf_counter()
        ticker = asyncio.create_task(progress(t0))
        try:
            await asyncio.gather(*(conversation(client, s, qs) for s, qs in convs))
        finally:
            ticker.cancel()
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": len(latencies), "errors": errors, **tokens, "sent": sent,
            "mean_latency_s": sum(latencies) / max(1, len(latencies))}


def tokenize(url: str, model: str, messages: list[dict]) -> list[int]:
    req = urllib.request.Request(url + "/tokenize", data=json.dumps({"model": model, "messages": messages}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["tokens"]


def ideal_hit_rate(prompts: list[list[int]], block_size: int) -> float:
    """Hit rate of one unbounded prefix cache that has seen every earlier prompt (block-aligned).

    Like the engine, a prompt reuses whole blocks only, and all of itself but its last token
    when every block is cached (at least one token is computed). Generated tokens are not counted, so a real cache can beat this by the
    blocks of a previous answer that a later turn's prompt repeats.
    """
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for ids in prompts:
        n = 0
        while n < len(ids) // block_size and tuple(ids[:(n + 1) * block_size]) in seen:
            n += 1
        hit, total = hit + min(n * block_size, len(ids) - 1), total + len(ids)
        seen.update(tuple(ids[:(i + 1) * block_size]) for i in range(len(ids) // block_size))
    return hit / total if total else 0.0
