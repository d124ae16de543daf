"""The OpenAI surface beyond completions and chat, as the ``openai`` SDK uses it against a real
``tokenmill serve`` on 127.0.0.1: models retrieve/delete, response and error shapes, stored chat
completions (one server with ``--store``, one without), suffix and best_of, embeddings, responses."""
from __future__ import annotations

import httpx
import openai
import pytest
from api_conftest import SMALL_ENGINE, assert_error, launch_server, stop_server, wait_healthy

from tokenmill.testing.tiny_models import make_tiny_model

MODEL = "tiny"
ALIAS = "org/tiny-alias"
FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@pytest.fixture(scope="module")
def model_dir():
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def fim_dir():
    return str(make_tiny_model("llama", extra_special_tokens=FIM))


@pytest.fixture(scope="module")
def servers(model_dir, fim_dir, tmp_path_factory):
    """``(tiny with --store, a fill-in-the-middle model without --store, pooling by mean)``, started side by side."""
    db = tmp_path_factory.mktemp("store") / "completions.db"
    both = [launch_server([model_dir, *SMALL_ENGINE, "--served-model-name", MODEL, ALIAS, "--store", str(db)]),
            launch_server([fim_dir, *SMALL_ENGINE, "--served-model-name", MODEL, "--embedding-pooling", "mean"])]
    try:
        for s in both:
            wait_healthy(s)
        yield both
    finally:
        for s in both:
            stop_server(s)
            s.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def plain(servers):
    return openai.OpenAI(base_url=servers[1].base_url, api_key="unused", max_retries=0, timeout=60)


# -- models ---------------------------------------------------------------------------------------
def test_models_retrieve(client):
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {MODEL, ALIAS}
    for name in (MODEL, ALIAS):  # a name with a slash is a path segment the SDK sends as is
        m = client.models.retrieve(name)
        assert (m.id, m.object, m.owned_by, m.created) == (name, "model", "tokenmill", listed[name].created)


def test_models_retrieve_unknown_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-nope")
    assert exc.value.code == "model_not_found"
    err = assert_error(httpx.get(server.base_url + "/models/gpt-nope"), 404, None)
    assert err["code"] == "model_not_found" and "gpt-nope" in err["message"]


def test_models_delete(client, server):
    with pytest.raises(openai.PermissionDeniedError) as exc:
        client.models.delete(MODEL)
    assert exc.value.code == "model_not_deletable"
    assert client.models.retrieve(MODEL).id == MODEL  # still served
    with pytest.raises(openai.NotFoundError):
        client.models.delete("ft:gpt-4o-mini:acme:x:1")
    assert_error(httpx.delete(server.base_url + f"/models/{MODEL}"), 403, None)


# -- shapes ---------------------------------------------------------------------------------------
def test_chat_refusal_fields_are_null(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True}
    choice = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert "refusal" in choice["logprobs"] and choice["logprobs"]["refusal"] is None
    with httpx.stream("POST", server.base_url + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: {"))
    delta = httpx.Response(200, content=first[6:]).json()["choices"][0]["delta"]
    assert delta["role"] == "assistant" and "refusal" in delta and delta["refusal"] is None


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/chat/completions", {"model": MODEL, "messages": []}),         # validation
    ("POST", "/completions", {"model": MODEL, "prompt": "x", "top_p": 7}),   # sampling params
    ("GET", "/no/such/route", None),                                         # the router's 404
    ("PUT", "/models", None),                                                # the router's 405
])
def test_error_code_is_string_or_null(server, method, path, body):
    r = httpx.request(method, server.base_url + path, json=body, timeout=60)
    assert r.status_code >= 400
    err = assert_error(r, r.status_code)
    assert err["code"] is None or isinstance(err["code"], str), err


def test_logit_bias_bad_key_is_named(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={"foo": 1})
    assert exc.value.param == "logit_bias" and "'foo'" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       logit_bias={"12": 1, "1.5": 2})
    assert exc.value.param == "logit_bias" and "'1.5'" in exc.value.message
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=3, logit_bias={"12": 100}, temperature=0)
    assert r.choices[0].text == httpx.post(server.url + "/detokenize", json={"tokens": [12, 12, 12]}).json()["prompt"]


# -- stored chat completions ----------------------------------------------------------------------
def _chat(client, text, **kw):
    kw.setdefault("max_tokens", 3)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], temperature=0,
                                          **kw)


def test_store_roundtrip(client):
    made = _chat(client, "stored one", store=True, metadata={"topic": "a", "run": "rt"})
    got = client.chat.completions.retrieve(made.id)
    assert got.id == made.id and got.model == MODEL and got.metadata == {"topic": "a", "run": "rt"}
    assert got.choices[0].message.content == made.choices[0].message.content
    assert got.usage.completion_tokens == made.usage.completion_tokens
    messages = client.chat.completions.messages.list(made.id)
    assert [(m.id, m.role, m.content) for m in messages.data] == [(f"{made.id}-0", "user", "stored one")]
    updated = client.chat.completions.update(made.id, metadata={"topic": "b"})
    assert updated.metadata == {"topic": "b"} and client.chat.completions.retrieve(made.id).metadata == {"topic": "b"}
    gone = client.chat.completions.delete(made.id)
    assert (gone.id, gone.deleted, gone.object) == (made.id, True, "chat.completion.deleted")
    for call in (client.chat.completions.retrieve, client.chat.completions.delete,
                 client.chat.completions.messages.list):
        with pytest.raises(openai.NotFoundError):
            call(made.id)


def test_store_list_pages_filters(client):
    unstored = _chat(client, "not kept", metadata={"run": "pages"})
    ids = [_chat(client, f"page {i}", store=True, metadata={"run": "pages", "i": str(i)}).id for i in range(5)]
    mine = {"run": "pages"}
    everything = client.chat.completions.list(metadata=mine, limit=100)
    assert [c.id for c in everything.data] == ids and unstored.id not in [c.id for c in everything.data]
    first = client.chat.completions.list(metadata=mine, limit=2)
    assert [c.id for c in first.data] == ids[:2] and first.has_more
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=2, after=ids[1]).data] == ids[2:4]
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=100, order="desc").data] == ids[::-1]
    assert [c.id for c in client.chat.completions.list(metadata=mine, order="desc", after=ids[2]).data] == ids[1::-1]
    assert [c.id for c in client.chat.completions.list(metadata={"run": "pages", "i": "3"}).data] == [ids[3]]
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=100, model=ALIAS).data] == []
    assert [c.id for c in client.chat.completions.list(metadata=mine, model=MODEL).data] == ids
    # the SDK's auto-paging follows first/last ids and has_more across pages
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=2)] == ids
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.list(limit=1000)
    assert exc.value.param == "limit"
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, "x", store=True, metadata={"k": 1})
    assert exc.value.param == "metadata"


def test_store_messages_pages_and_parts(client):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    made = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, store=True)
    page = client.chat.completions.messages.list(made.id, limit=2)
    assert [m.role for m in page.data] == ["system", "user"] and page.has_more
    assert page.data[1].content == "part one\ntwo" and [p.text for p in page.data[1].content_parts] == ["part one", "two"]
    assert page.data[0].content_parts is None
    rest = client.chat.completions.messages.list(made.id, after=page.data[1].id)
    assert [m.content for m in rest.data] == ["ok", "again"] and not rest.has_more
    desc = client.chat.completions.messages.list(made.id, order="desc")
    assert [m.id for m in desc.data] == [f"{made.id}-{i}" for i in (3, 2, 1, 0)]


def test_store_streamed(client):
    chunks = list(_chat(client, "stream me", store=True, stream=True, max_tokens=6))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    got = client.chat.completions.retrieve(chunks[0].id)
    assert got.choices[0].message.content == text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 6


def test_store_off(plain, servers):
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(plain, "x", store=True)
    assert (exc.value.param, exc.value.code) == ("store", "store_disabled")
    assert _chat(plain, "x", store=False).choices  # store false (or absent) is fine
    for method, path in (("GET", "/chat/completions"), ("GET", "/chat/completions/chatcmpl-1"),
                         ("DELETE", "/chat/completions/chatcmpl-1"), ("GET", "/chat/completions/chatcmpl-1/messages")):
        err = assert_error(httpx.request(method, servers[1].base_url + path), 400, "store")
        assert err["code"] == "store_disabled"


# -- completions: suffix and best_of --------------------------------------------------------------
def test_suffix_fill_in_the_middle(plain, fim_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fim_dir)
    fp, fs, fm = tok.convert_tokens_to_ids(list(FIM))
    ids = tok.encode("") + [fp, *tok.encode("def f(a", add_special_tokens=False), fs,
                            *tok.encode("    return a", add_special_tokens=False), fm]
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    filled = plain.completions.create(prompt="def f(a", suffix="    return a", **kw)
    by_hand = plain.completions.create(prompt=ids, **kw)
    assert filled.choices[0].text == by_hand.choices[0].text and filled.choices[0].text
    assert filled.usage.prompt_tokens == len(ids)


def test_suffix_needs_fim_tokens(client, plain):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="def f(", suffix="x", max_tokens=2)
    assert exc.value.param == "suffix" and "fill-in-the-middle" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        plain.completions.create(model=MODEL, prompt="def f(", suffix="x", max_tokens=2, echo=True)
    assert exc.value.param == "suffix"


def test_best_of_keeps_the_most_likely(client):
    kw = dict(model=MODEL, prompt="The", max_tokens=5, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    everything = client.completions.create(n=4, logprobs=0, **kw)
    ranked = sorted(everything.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 4 * 5  # every candidate was generated
    with_lp = client.completions.create(n=1, best_of=4, logprobs=1, **kw)
    assert with_lp.choices[0].logprobs.token_logprobs == ranked[0].logprobs.token_logprobs


@pytest.mark.parametrize("extra", [{"n": 3, "best_of": 2}, {"best_of": 21}, {"best_of": 3, "stream": True}])
def test_best_of_bounds(server, extra):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}
    assert_error(httpx.post(server.base_url + "/completions", json=body, timeout=60), 400, "best_of")


# -- embeddings -----------------------------------------------------------------------------------
def _hf_embedding(model_dir, texts, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            states = model(torch.tensor([tok.encode(t)])).last_hidden_state[0]
            vec = states[-1] if pooling == "last" else states.mean(0)
            out.append((vec / vec.norm()).tolist())
    return out


def test_embeddings_last_token(client, server, model_dir):
    texts = ["def main():", "The quick brown fox jumps over the lazy dog"]
    r = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.model == MODEL and r.object == "list"
    for d, ref in zip(r.data, _hf_embedding(model_dir, texts, "last")):
        assert d.object == "embedding" and len(d.embedding) == 128
        assert max(abs(a - b) for a, b in zip(d.embedding, ref)) < 1e-4
    ids = httpx.post(server.url + "/tokenize", json={"prompt": texts[0]}).json()
    by_ids = client.embeddings.create(model=MODEL, input=[ids["tokens"]])
    assert max(abs(a - b) for a, b in zip(by_ids.data[0].embedding, r.data[0].embedding)) < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens > ids["count"]


def test_embeddings_base64_and_dimensions(client, server):
    import base64
    import struct

    plain = client.embeddings.create(model=MODEL, input="hello world", dimensions=128)
    raw = httpx.post(server.base_url + "/embeddings", json={"model": MODEL, "input": "hello world",
                                                            "encoding_format": "base64"}, timeout=60).json()
    decoded = struct.unpack("<128f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, plain.data[0].embedding)) < 1e-6
    sdk = client.embeddings.create(model=MODEL, input="hello world", encoding_format="base64")
    assert isinstance(sdk.data[0].embedding, str)
    for body, param in (({"dimensions": 8}, "dimensions"), ({"encoding_format": "int8"}, "encoding_format"),
                        ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [999999]}, "input")):
        r = httpx.post(server.base_url + "/embeddings", json={"model": MODEL, "input": "x", **body}, timeout=60)
        assert_error(r, 400, param)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_embeddings_mean_pooling(plain, fim_dir):
    texts = ["a longer input, so that the mean differs from the last token"]
    r = plain.embeddings.create(model=MODEL, input=texts)
    ref = _hf_embedding(fim_dir, texts, "mean")[0]
    assert max(abs(a - b) for a, b in zip(r.data[0].embedding, ref)) < 1e-4


# -- responses ------------------------------------------------------------------------------------
def test_responses_text(client):
    r = client.responses.create(model=MODEL, input="hello there", instructions="be brief", max_output_tokens=5,
                                temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert r.object == "response" and r.model == MODEL and r.output_text == chat.choices[0].message.content
    (item,) = r.output
    assert (item.type, item.role, item.content[0].type) == ("message", "assistant", "output_text")
    if chat.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    items = client.responses.create(model=MODEL, max_output_tokens=5, temperature=0, input=[
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello "},
                                                        {"type": "input_text", "text": "there"}]}])
    assert items.output_text == r.output_text


def test_responses_stream(client):
    kw = dict(model=MODEL, input="tell me", max_output_tokens=6, temperature=0)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == client.responses.create(**kw).output_text
    assert final.usage.output_tokens == 6 or final.status == "completed"


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_responses_refused(server, body, param):
    r = httpx.post(server.base_url + "/responses", json={"model": MODEL, "input": "x", **body}, timeout=60)
    assert_error(r, 400, param)
