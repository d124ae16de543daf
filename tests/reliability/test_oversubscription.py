"""KV oversubscription: a load ~10x larger than the KV cache completes, prefix caching on and off.

The rule (issue 9): any load whose every single request fits the pool completes, whatever the
concurrency, with greedy output equal to the same requests run one at a time. The cache here
holds 13 blocks of 16 tokens; 32 concurrent requests of 40 + 24 tokens need 4 blocks each, 128
in all. Then a disconnect storm: hundreds of streams cancelled mid-way leave 0 blocks in use.
"""
from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from conftest import MODEL, complete, kv_blocks_in_use, started_together, wait_for

KV = str(13 * 16 * 2048)  # 13 blocks: float32, 4 layers x 1 KV head x 64 x (K, V) = 2 KiB a token
NUM_REQUESTS, MAX_TOKENS = 32, 24


def _prompts() -> list[list[int]]:
    rng = random.Random(9)
    heads = [[rng.randrange(5, 4000) for _ in range(32)] for _ in range(4)]  # shared prefixes
    return [heads[i % 4] + [rng.randrange(5, 4000) for _ in range(8)] for i in range(NUM_REQUESTS)]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def servers():
    """Two servers on the same too-small cache, started together: prefix caching on and off."""
    with started_together(on=["--kv-cache-memory", KV], off=["--kv-cache-memory", KV, "--no-prefix-caching"]) as s:
        yield s


@pytest.fixture(scope="module")
def one_at_a_time(servers):
    """Each request alone (on the server without a prefix cache): the reference outputs."""
    with httpx.Client(timeout=60) as client:
        out = []
        for p in PROMPTS:
            r = complete(client, servers["off"].url, p, MAX_TOKENS)
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["text"])
    return out


async def _concurrent(url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        return await asyncio.gather(*(client.post(url + "/v1/completions", json={**body, "prompt": p})
                                      for p in PROMPTS))


@pytest.mark.parametrize("prefix", ["on", "off"])
def test_thirty_two_concurrent_on_a_cache_ten_times_too_small(servers, one_at_a_time, prefix):
    url = servers[prefix].url
    responses = asyncio.run(_concurrent(url))
    assert [r.status_code for r in responses] == [200] * NUM_REQUESTS, [r.text for r in responses if r.status_code != 200][:2]
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in responses)
    assert texts == one_at_a_time
    m = httpx.get(url + "/metrics", timeout=10).text
    preemptions = [float(line.split()[-1]) for line in m.splitlines() if line.startswith("tokenmill:num_preemptions")]
    assert preemptions and preemptions[0] > 0  # the cache really was oversubscribed
    assert wait_for(lambda: kv_blocks_in_use(url) == 0, timeout=10)


def test_single_request_larger_than_the_pool_is_a_400_and_others_complete(servers):
    url = servers["on"].url
    with httpx.Client(timeout=60) as client:
        r = complete(client, url, PROMPTS[0], 200)  # 240 tokens: 15 blocks > 13
        assert r.status_code == 400, r.text
        assert "KV cache" in r.json()["error"]["message"]
        ok = complete(client, url, PROMPTS[1], MAX_TOKENS)
        assert ok.status_code == 200


async def _storm(url: str, n: int) -> int:
    """Open ``n`` streams at once and drop each after its first chunk; returns how many streamed."""
    async def one(client, i):
        body = {"model": MODEL, "prompt": PROMPTS[i % NUM_REQUESTS], "max_tokens": 64, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                return 1
        return 0

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return sum(await asyncio.gather(*(one(client, i) for i in range(n))))


def test_disconnect_storm_leaves_no_block_in_use(servers):
    url = servers["on"].url
    assert asyncio.run(_storm(url, 200)) == 200
    assert wait_for(lambda: kv_blocks_in_use(url) == 0, timeout=20)
    with httpx.Client(timeout=60) as client:  # and it still serves
        assert complete(client, url, PROMPTS[2], 4).status_code == 200
