"""The OpenAI-compatible server, as clients use it: a real ``tokenmill serve`` subprocess on
127.0.0.1, driven by the ``openai`` SDK (raw httpx for errors and disconnects), checked
against the offline ``tokenmill.LLM`` on the same tiny model."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest
from api_conftest import SMALL_ENGINE, assert_error, metrics, running_server, wait_for

from tokenmill.testing.tiny_models import make_tiny_model

MODEL = "tiny"
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def model_dir():
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def stack(model_dir):
    def offline():  # loads while the server starts
        from tokenmill import LLM

        return LLM(model_dir, device="cpu", kv_cache_memory=8 << 20, max_model_len=256)

    with running_server([model_dir, *SMALL_ENGINE, "--served-model-name", MODEL,
                         "--max-body-bytes", str(BODY_LIMIT)], while_starting=offline) as pair:
        yield pair


@pytest.fixture(scope="module")
def server(stack):
    return stack[0]


@pytest.fixture(scope="module")
def llm(stack):
    return stack[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def greedy(llm, prompts, max_tokens=8, **kw):
    from tokenmill import SamplingParams

    return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw))


# -- basics ---------------------------------------------------------------------------------------
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completion_matches_offline(client, llm):
    r = client.completions.create(model=MODEL, prompt="def main(", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    (offline,) = greedy(llm, ["def main("])
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == offline.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_stream_with_usage(client, llm):
    chunks = list(client.completions.create(model=MODEL, prompt="class A:", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    (offline,) = greedy(llm, ["class A:"])
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(offline.prompt_token_ids)


def test_chat_and_chat_stream(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    (offline,) = llm.chat(messages, _params(max_tokens=6))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline.outputs[0].text
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids) and r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_continue_final_message(client, llm):
    messages = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "Once upon"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True, "echo": True, "add_generation_prompt": False,
                                                   "continue_final_message": True})
    prompt = llm.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert prompt.endswith("Once upon")
    (offline,) = greedy(llm, [{"prompt": prompt, "prompt_token_ids": llm.tokenizer.encode(
        prompt, add_special_tokens=False)}], max_tokens=4)
    assert r.choices[0].message.content == "Once upon" + offline.outputs[0].text
    bad = httpx.post(str(client.base_url).rstrip("/") + "/chat/completions",
                     json={"model": MODEL, "messages": messages, "continue_final_message": True})
    assert_error(bad, 400, "messages")  # add_generation_prompt defaults to true: both cannot hold


def _params(**kw):
    from tokenmill import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def test_n_greater_than_one(client):
    r = client.completions.create(model=MODEL, prompt="import os", max_tokens=5, n=3, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    assert len({c.text for c in r.choices}) > 1  # seed + i per completion: they differ
    texts: dict[int, str] = {}
    finish = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, n=2, temperature=1.0, seed=3, stream=True,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}


def test_prompt_batch(client, llm):
    prompts = ["a = 1", "for x in"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    offline = greedy(llm, prompts, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in offline for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in offline)


def test_logprobs(client, llm):
    r = client.completions.create(model=MODEL, prompt="x = [", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    (offline,) = greedy(llm, ["x = ["], max_tokens=5, logprobs=2)
    out = offline.outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    expected = [out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # top 2 plus the chosen token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy: chosen is top-1


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="The", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    k = next(k for k in range(3, len(base) - 2) if base.find(base[k:k + 2]) == k and base[k:k + 2].strip())
    stop = base[k:k + 2]
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:k]
    assert r.choices[0].finish_reason == "stop"
    assert getattr(r.choices[0], "stop_reason", None) == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The", max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True}) if c.choices)
    assert streamed == base[:k + 2]


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="while", max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    a = sample(123)
    assert sample(123) == a
    assert sample(124) != a


def test_vllm_extras(client, llm):
    base = client.completions.create(model=MODEL, prompt="try:", max_tokens=8, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True})
    top1 = client.completions.create(model=MODEL, prompt="try:", max_tokens=8, temperature=1.0, seed=5,
                                     extra_body={"ignore_eos": True, "top_k": 1, "min_p": 0.0,
                                                 "repetition_penalty": 1.0})
    assert top1.choices[0].text == base.choices[0].text  # top_k=1 is greedy
    (offline,) = greedy(llm, ["try:"], max_tokens=8)
    stop_id = offline.outputs[0].token_ids[3]
    first = offline.outputs[0].token_ids.index(stop_id)
    r = client.completions.create(model=MODEL, prompt="try:", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id], "min_tokens": 0})
    assert r.choices[0].finish_reason == "stop" and getattr(r.choices[0], "stop_reason") == stop_id
    assert r.usage.completion_tokens == first + 1
    r = client.completions.create(model=MODEL, prompt="try:", max_tokens=4, temperature=0,
                                  extra_body={"prompt_logprobs": 1})
    plp = getattr(r.choices[0], "prompt_logprobs")
    assert plp[0] is None and len(plp) == r.usage.prompt_tokens
    assert all(1 <= len(pos) <= 2 for pos in plp[1:])


def test_cache_salt_separates_prefix_cache(client):
    prompt = "cached prefix " * 12  # several full 16-token blocks

    def cached(salt):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": salt})
        details = r.usage.prompt_tokens_details
        return details.cached_tokens if details else 0

    cached("tenant-a")
    assert cached("tenant-a") >= 16
    assert cached("tenant-b") == 0


def test_continuous_usage_stats(server):
    body = {"model": MODEL, "prompt": "if x:", "max_tokens": 6, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    prompt_tokens = httpx.post(server.url + "/tokenize", json={"prompt": "if x:"}).json()["count"]
    usages = []
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert chunk["usage"]["prompt_tokens"] == prompt_tokens
        usages.append(chunk["usage"]["completion_tokens"])
    assert usages == sorted(usages) and usages[-1] == 6


def test_echo_and_lm_eval_loglikelihood(client, server, llm):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith("Hello")
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "print(len(x))"}).json()["tokens"]
    (offline,) = greedy(llm, [ids], max_tokens=1, prompt_logprobs=1)
    expected = [None] + [offline.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]
    for max_tokens in (0, 1):
        # What lm-eval's loglikelihood sends: token-id prompts, echo, logprobs, max_tokens 0 or 1.
        r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=max_tokens, echo=True, logprobs=1,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
        for i in range(1, len(ids)):
            top = lp.top_logprobs[i]
            assert lp.tokens[i] in top and max(top.values()) >= top[lp.tokens[i]]
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    # streaming echo sends the prompt first
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, echo=True, stream=True,
                                            temperature=0))
    assert chunks[0].choices[0].text.startswith("Hello")


def test_tokenize_detokenize(server, llm):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


def test_unknown_fields_ignored(server):
    r = httpx.post(server.base_url + "/completions",
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2, "frobnicate": {"a": 1}, "user": "u1"})
    assert r.status_code == 200, r.text


# -- concurrency ----------------------------------------------------------------------------------
def test_64_concurrent_streams_match_offline(server, llm):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prompts = [f"{words[i % 12]} {words[(i * 5) % 12]} {i}" for i in range(64)]
    expected = [o.outputs[0].text for o in greedy(llm, prompts, max_tokens=12)]

    async def one(aclient, prompt):
        text = ""
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
        return text

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=80)))
        async with aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    got = asyncio.run(main())
    mismatches = [i for i in range(64) if got[i] != expected[i]]
    assert not mismatches, [(prompts[i], got[i], expected[i]) for i in mismatches[:3]]


# -- errors ---------------------------------------------------------------------------------------
ERROR_CASES = {
    "bad temperature": ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    "bad top_p": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                           "top_p": 5}, 400, "top_p"),
    "wrong type": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    "missing prompt": ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    "empty messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    "prompt too long": ("/v1/completions", {"model": MODEL, "prompt": [5] * 300, "max_tokens": 1}, 400, "prompt"),
    "max_tokens too large": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400,
                             "max_tokens"),
    "token id out of vocab": ("/v1/completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt"),
    "logit_bias out of vocab": ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"999999": 1}},
                                400, "logit_bias"),
    "seed too large": ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
    "too many logprobs": ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    "stream bad n": ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0, "stream": True}, 400, "n"),
    "unknown model": ("/v1/completions", {"model": "gpt-17", "prompt": "x"}, 404, "model"),
    "unknown route": ("/v1/audio/speech", {"model": MODEL, "input": "x"}, 404, None),
    "oversized body": ("/v1/completions", {"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10)}, 413, None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(server, case):
    path, body, status, param = ERROR_CASES[case]
    assert_error(httpx.post(server.url + path, json=body, timeout=30), status, param)
    ok = httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_fields_we_cannot_honour_are_400s(server, client):
    # audio output would change the response; a silent text-only 200 would be a lie (see api/fields.py)
    r = httpx.post(server.base_url + "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}})
    err = assert_error(r, 400)
    assert err["param"] in ("audio", "modalities") and err["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="a", suffix="b", max_tokens=2)
    # fields without effect on the output are accepted
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="u", metadata={"k": "v"}, service_tier="auto", store=False)
    assert r.choices[0].message.content is not None


def test_invalid_json_and_context_error_code(server):
    r = httpx.post(server.base_url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    r = httpx.post(server.base_url + "/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]})
    assert assert_error(r, 400, "messages")["code"] == "context_length_exceeded"


# -- disconnects ----------------------------------------------------------------------------------
def _engine_idle(url):
    m = metrics(url)
    return m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0 \
        and m["tokenmill:kv_cache_usage_perc"] == 0 and m


def test_stream_disconnect_frees_blocks(server):
    wait_for(lambda: _engine_idle(server.url))
    before = metrics(server.url)
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        during = metrics(server.url)
        assert during["tokenmill:num_requests_running"] == 1
        assert during["tokenmill:kv_cache_usage_perc"] > 0
    after = wait_for(lambda: _engine_idle(server.url))
    assert after["tokenmill:request_aborted_total"] == before.get("tokenmill:request_aborted_total", 0) + 1
    assert after["tokenmill:generation_tokens_total"] - before["tokenmill:generation_tokens_total"] < 250


def test_non_stream_disconnect_frees_blocks(server):
    wait_for(lambda: _engine_idle(server.url))
    before = metrics(server.url)
    # 250 decode steps of 8 sequences: several times the client's 0.1 s even with decode in one C call
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", timeout=0.1,
                   json={"model": MODEL, "prompt": "ab", "max_tokens": 250, "ignore_eos": True, "n": 8})
    after = wait_for(lambda: _engine_idle(server.url))
    assert after["tokenmill:request_aborted_total"] == before.get("tokenmill:request_aborted_total", 0) + 1


# -- metrics and the benchmark --------------------------------------------------------------------
def test_metrics(server, client):
    prompt = "the quick brown fox jumps over the lazy dog " * 4  # > one 16-token block: a prefix-cache hit
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    bad = httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400  # counted below, so this test does not rely on the error tests running first
    m = metrics(server.url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total"):
        assert f"tokenmill:{name}" in m
    assert m["tokenmill:prefix_cache_hit_rate"] > 0
    assert m["tokenmill:prompt_tokens_total"] > 0 and m["tokenmill:generation_tokens_total"] > 0
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert m[f"tokenmill:{h}_count"] > 0
    assert m["tokenmill:request_errors_total"] > 0


def test_bench_serve(server, tmp_path):
    png, out = tmp_path / "lat.png", tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "serve", "--base-url", server.url,
                           "--concurrency", "1,4", "--num-requests", "8", "--max-tokens", "6",
                           "--prompt-text", "hello there", "--plot", str(png), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT p50" in proc.stdout and "out tok/s" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["concurrency"] for r in results] == [1, 4]
    assert all(r["failed"] == 0 and r["output_tokens"] == 8 * 6 for r in results)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_counts_error_responses_as_failed(server):
    """A non-200 answer is a failed request carrying the server's status and body, not a crash."""
    import asyncio

    from tokenmill.bench.serve import _level

    body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 3, "stream": True}
    r = asyncio.run(_level(server.url, {}, [body] * 3, [body], concurrency=2, timeout=60))
    assert r["requests"] == 3 and r["failed"] == 3 and r["output_tokens"] == 0
    assert r["errors"] and r["errors"][0].startswith("HTTP 404") and "no-such-model" in r["errors"][0]


def test_bench_serve_side_by_side(server, model_dir, tmp_path):
    """--against-vllm URL: a launched tokenmill and a second OpenAI server take turns in one run.

    The "peer" here is the module's tokenmill server (same checkpoint), so the greedy outputs must
    agree and every ratio is computed from real measurements of both."""
    png, out = tmp_path / "sbs.png", tmp_path / "sbs.json"
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "serve", "--launch", model_dir,
                           "--against-vllm", server.url, "--concurrency", "1,2", "--num-requests", "4",
                           "--max-tokens", "5", "--prompt-text", "hello there", "--plot", str(png),
                           "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 2 | out tok/s |" in proc.stdout and "greedy output identical" in proc.stdout
    runs = json.loads(out.read_text())
    assert set(runs) == {"tokenmill", "vllm"} and all(len(r) == 1 for r in runs.values())
    assert all(lvl["failed"] == 0 and lvl["output_tokens"] == 4 * 5 for eng in runs.values() for lvl in eng[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_prompt_lens_side_by_side(server, model_dir, tmp_path):
    """--prompt-lens: distinct exact-length prompts per request, both servers, no prefix-cache hits."""
    png, out = tmp_path / "lens.png", tmp_path / "lens.json"
    proc = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "serve", "--launch", model_dir,
                           "--launch-args=--max-model-len 256", "--against-vllm", server.url, "--prompt-lens", "16,40",
                           "--concurrency", "1,2", "--num-requests", "3", "--max-tokens", "4", "--plot", str(png),
                           "--json-out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 40 | 2 |" in proc.stdout and "greedy output identical" in proc.stdout
    assert "prefill against the matmul limit" in proc.stdout and "KV cache per token" in proc.stdout
    res = json.loads(out.read_text())
    for eng in ("tokenmill", "vllm"):
        (cases,) = res["runs"][eng]
        assert [(c["prompt_len"], c["concurrency"]) for c in cases] == [(16, 1), (16, 2), (40, 1), (40, 2)]
        assert all(c["failed"] == 0 and c["output_tokens"] == 3 * 4 for c in cases)
        (cache,) = res["prefix_cache"][eng]
        assert cache["hit_tokens"] == 0 and cache["queried_tokens"] == (1 + 3 + 2 + 3) * (16 + 40)  # warm-ups + requests
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_side_by_side_table_flags_different_outputs():
    from tokenmill.bench.side_by_side import side_by_side_table

    def lvl(tok_s, digest):
        return {"output_tok_s": tok_s, "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_mean_ms": 2.0,
                "outputs": [digest]}
    table, same = side_by_side_table({"tokenmill": [[lvl(300.0, "a")]], "vllm": [[lvl(200.0, "a")]]}, [8])
    assert same and "| 8 | out tok/s | 300 | 200 | 1.50x |" in table
    table, same = side_by_side_table({"tokenmill": [[lvl(300.0, "a")]], "vllm": [[lvl(200.0, "b")]]}, [8])
    assert not same and "differ" in table
