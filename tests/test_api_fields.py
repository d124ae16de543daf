"""The request-field table: refusals are 400s naming the field, no-effect fields pass, the docs page is current."""
from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.api.errors import APIError
from tokenmill.api.fields import CHAT_FIELDS, COMPLETION_FIELDS, HONOURED, NO_EFFECT, REFUSED, TABLES, \
    check_fields, render_markdown
from tokenmill.api.protocol import ChatCompletionRequest, CompletionRequest

DOC = Path(__file__).resolve().parents[1] / "docs" / "openai-fields.md"
MESSAGES = [{"role": "user", "content": "hi"}]

# Every field of OpenAI's chat/completions and completions request bodies (openai-python's create params).
OPENAI_CHAT = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
}
OPENAI_COMPLETIONS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}


def chat(**kw):
    return ChatCompletionRequest(messages=MESSAGES, **kw)


def refused(req, endpoint) -> APIError:
    with pytest.raises(APIError) as info:
        check_fields(req, endpoint)
    err = info.value
    assert err.status == 400 and err.code == "unsupported_parameter"
    return err


def test_table_covers_every_openai_field_once():
    for table, fields in ((CHAT_FIELDS, OPENAI_CHAT), (COMPLETION_FIELDS, OPENAI_COMPLETIONS)):
        names = [r.name for r in table]
        assert len(names) == len(set(names))
        assert set(names) == fields
        assert all(r.status in (HONOURED, NO_EFFECT, REFUSED) for r in table)


def test_honoured_fields_are_declared_by_the_request_models():
    # "honoured" must mean the request model reads the field (fields honoured for some values only
    # are checked by the table's own refuse()).
    for endpoint, model in (("chat.completions", ChatCompletionRequest), ("completions", CompletionRequest)):
        for r in TABLES[endpoint]:
            if r.status == HONOURED and r.refuse is None:
                assert r.name in model.model_fields, f"{endpoint}: {r.name} is listed as honoured but not declared"


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
    ("reasoning_effort", "high"),
    ("verbosity", "low"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
])
def test_chat_refusals_name_the_field(field, value):
    err = refused(chat(**{field: value}), "chat.completions")
    assert err.param == field and field in err.message


@pytest.mark.parametrize("field,value", [
    ("use_beam_search", True), ("allowed_token_ids", [1, 2]), ("bad_words", ["x"]), ("logits_processors", ["m.f"]),
    ("truncate_prompt_tokens", 8), ("return_tokens_as_token_ids", True), ("prompt_embeds", "AAAA"),
])
@pytest.mark.parametrize("endpoint", ["chat.completions", "completions"])
def test_vllm_extensions_we_do_not_implement_are_refused(field, value, endpoint):
    req = chat(**{field: value}) if endpoint == "chat.completions" else CompletionRequest(prompt="x", **{field: value})
    err = refused(req, endpoint)
    assert err.param == field and field in err.message
    # their harmless values pass
    check_fields(chat(use_beam_search=False, length_penalty=0.5, return_tokens_as_token_ids=False), "chat.completions")


def test_completion_fields_left_to_the_endpoint():
    # suffix and best_of are honoured; the endpoint refuses what a model cannot do
    # (tests/test_api_openai_surface.py)
    check_fields(CompletionRequest(prompt="x", suffix="tail", best_of=3), "completions")


@pytest.mark.parametrize("kw", [
    {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k",
     "safety_identifier": "s", "prediction": {"type": "content", "content": "x"}},
    {"modalities": ["text"], "verbosity": "medium", "audio": None, "response_format": {"type": "text"}},
])
def test_no_effect_and_default_values_are_accepted(kw):
    check_fields(chat(**kw), "chat.completions")


def test_docs_page_is_generated_from_the_table():
    assert DOC.read_text() == render_markdown(), \
        "docs/openai-fields.md is stale: run python -m tokenmill.api.fields > docs/openai-fields.md"
    for r in CHAT_FIELDS + COMPLETION_FIELDS:
        assert f"| `{r.name}` | {r.status} |" in DOC.read_text()
