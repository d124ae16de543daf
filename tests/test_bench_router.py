"""``tokenmill bench router``'s pure parts: the settings it compares and the ideal hit rate it reports."""
from __future__ import annotations

import pytest

from tokenmill.bench.router import ideal_hit_rate, parse_settings


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
    # never the whole prompt: an exact repeat of a two-block prompt reuses one block
    assert ideal_hit_rate([system, system], 16) == pytest.approx(16 / 64)
