"""``tokenmill bench router``'s own parts: the settings it compares, the ideal hit rate it reports, and
the client that drives the workload (against a stand-in endpoint: requests in flight, conversations
under way, the history every turn resends)."""
from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import httpx
import pytest

from tokenmill.bench.router import parse_settings
from tokenmill.bench.router_workload import RandomGate, drive, ideal_hit_rate


def test_settings_are_the_policies_then_each_cache_aware_variant():
    got = parse_settings("cache_aware,round_robin", "cache_threshold=0.8; balance_abs_threshold=4,max_tree_size=100")
    assert [s["name"] for s in got] == ["cache_aware", "round_robin", "cache_aware(ct=0.8)",
                                        "cache_aware(abs=4,tree=100)"]
    assert got[2] == {"policy": "cache_aware", "cache_threshold": 0.8, "name": "cache_aware(ct=0.8)"}
    assert got[3]["balance_abs_threshold"] == 4 and got[3]["max_tree_size"] == 100


@pytest.mark.parametrize("policies, variants, message", [
    ("fastest", "", "unknown policy 'fastest'"),
    ("", "cache_threshold", "is not key=value"),
    ("", "tree_size=3", "is not key=value"),
    ("", "balance_abs_threshold=lots", "balance_abs_threshold must be int"),
    ("", "", "nothing to run"),
])
def test_bad_settings_are_refused_naming_the_flag(policies, variants, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(policies, variants)


def test_ideal_hit_rate_reuses_whole_blocks_seen_in_earlier_prompts_only():
    system = list(range(100, 132))  # exactly two blocks of 16
    a = system + [1, 2, 3]
    b = system + [4, 5]           # shares both system blocks with a
    c = list(range(100, 116)) + [9] * 20  # shares the first block only
    assert ideal_hit_rate([a], 16) == 0.0
    assert ideal_hit_rate([a, b], 16) == pytest.approx(32 / (35 + 34))
    assert ideal_hit_rate([a, b, c], 16) == pytest.approx((32 + 16) / (35 + 34 + 36))
    # an exact repeat of a two-block prompt reuses all of it but its last token
    assert ideal_hit_rate([system, system], 16) == pytest.approx(31 / 64)


def test_random_gate_holds_at_most_n_and_hands_places_to_waiters_in_drawn_order():
    gate, holding, peak, order = RandomGate(2, random.Random(0)), [0], [0], []

    async def user(i):
        await gate.acquire()
        holding[0] += 1
        peak[0] = max(peak[0], holding[0])
        order.append(i)
        await asyncio.sleep(0)
        holding[0] -= 1
        gate.release()

    async def main():
        await asyncio.gather(*(user(i) for i in range(8)))

    asyncio.run(main())
    assert peak[0] == 2 and sorted(order) == list(range(8))
    assert order[:2] == [0, 1] and order != list(range(8))  # the first two walk in; the rest are drawn


def test_random_gate_skips_a_waiter_that_was_cancelled():
    async def main():
        gate = RandomGate(1, random.Random(0))
        await gate.acquire()
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        gate.release()  # nobody left waiting: the place is free again
        await asyncio.wait_for(gate.acquire(), 1)

    asyncio.run(main())


def _mock_router(turns: int):
    """A stand-in chat endpoint: answers each turn, and records what was in flight and under way."""
    seen = {"in_flight": 0, "peak_in_flight": 0, "under_way": set(), "peak_under_way": 0, "answers": {}}

    async def handler(request: httpx.Request) -> httpx.Response:
        msgs = json.loads(request.content)["messages"]
        conv = (msgs[0]["content"], msgs[1]["content"])
        seen["under_way"].add(conv)
        seen["peak_under_way"] = max(seen["peak_under_way"], len(seen["under_way"]))
        seen["in_flight"] += 1
        seen["peak_in_flight"] = max(seen["peak_in_flight"], seen["in_flight"])
        await asyncio.sleep(0.001 * (len(msgs) % 3))
        seen["in_flight"] -= 1
        turn = sum(m["role"] == "user" for m in msgs)
        if turn == turns:
            seen["under_way"].discard(conv)
        answer = f"answer {turn} to {conv[1]}"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": answer}}],
                                         "usage": {"prompt_tokens": len(msgs), "completion_tokens": 1}})

    return seen, httpx.MockTransport(handler)


def _args(**kw):
    base = dict(concurrency=2, active_conversations=None, turns=3, output_len=1, request_timeout_s=10.0, seed=0)
    return SimpleNamespace(**{**base, **kw})


CONVS = [(f"system {t}", [f"q{t}.{c}.{k}" for k in range(3)]) for t in range(3) for c in range(2)]


@pytest.mark.parametrize("active", [None, 3, 2])
def test_drive_caps_requests_in_flight_and_conversations_under_way(active):
    seen, transport = _mock_router(turns=3)
    res = asyncio.run(drive("http://router", "m", CONVS, _args(active_conversations=active), "t", transport))
    assert res["requests"] == 18 and not res["errors"]
    assert seen["peak_in_flight"] == 2
    assert seen["peak_under_way"] <= (active or len(CONVS))
    if active is None:  # unbounded: more conversations get under way than any cap tried here
        assert seen["peak_under_way"] > 3
    if active == 2:  # each conversation has a slot of its own, and both are always busy
        assert seen["peak_under_way"] == 2
    for msgs in res["sent"]:  # every turn resends the whole history, with the answers it got
        system, first = msgs[0]["content"], msgs[1]["content"]
        assert msgs[0]["role"] == "system" and [m["role"] for m in msgs[1:]] == ["user", "assistant"] * (
            len(msgs) // 2 - 1) + ["user"]
        assert [m["content"] for m in msgs[2::2]] == [f"answer {k + 1} to {first}" for k in range(len(msgs) // 2 - 1)]
        assert any(s == system and qs[0] == first and [m["content"] for m in msgs[1::2]] == qs[:len(msgs) // 2]
                   for s, qs in CONVS)


def _conversation_of(msgs):
    return msgs[1]["content"]


def test_turns_run_back_to_back_only_when_each_conversation_has_its_own_slot():
    _, transport = _mock_router(turns=3)
    own = asyncio.run(drive("http://r", "m", CONVS, _args(concurrency=1, active_conversations=1), "t", transport))
    order = [_conversation_of(m) for m in own["sent"]]
    assert order == [c for c in dict.fromkeys(order) for _ in range(3)]  # each conversation's 3 turns in a row

    _, transport = _mock_router(turns=3)
    shared = asyncio.run(drive("http://r", "m", CONVS, _args(concurrency=1), "t", transport))
    order = [_conversation_of(m) for m in shared["sent"]]
    assert order[1] != order[0]  # the freed slot goes to another user waiting, not the one who just got an answer
    assert sorted(order) == sorted(c for _, qs in CONVS for c in [qs[0]] * 3)
