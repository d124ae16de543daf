"""Schemathesis fuzzes the server against its own OpenAPI schema: whatever the request body,
the answer is never a 5xx, and the server keeps serving afterwards. Examples are bounded
(a few dozen per operation, derandomized) so the run stays short."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

EXAMPLES = 25
FUZZED = r"^/(v1/completions|v1/chat/completions|tokenize|detokenize|v1/models)$"


@pytest.fixture
def server(tiny_server):
    return tiny_server


def test_no_server_errors(server):
    # Driven by hand rather than schemathesis' pytest plugin (its lazy-fixture path needs pytest < 9).
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json").include(path_regex=FUZZED)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    seen = []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            resp = case.call(base_url=server.url, timeout=30)
            seen.append(resp.status_code)
            assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text[:500])
            if resp.status_code >= 400:  # OpenAI's error shape
                assert set(json.loads(resp.content)) == {"error"}, resp.content[:500]

        fuzz()
    assert len(seen) >= len(operations) * 5, len(seen)


def test_still_serving_after_the_fuzz(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
