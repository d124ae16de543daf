"""Every OpenAI request field of ``/v1/chat/completions`` and ``/v1/completions``, and what we do with it.

A field is **honoured** (it does what OpenAI documents), **accepted without effect** (it does
not change the output: ``user``, ``metadata``, ``service_tier``, ...), or **refused**: it would
change the output and we cannot do that, so a request that sets it gets a 400 saying so,
never a silent 200. Some honoured fields refuse particular values (``modalities`` with
``"audio"``). :func:`check_fields` is the one place the refusals are enforced; the endpoints
call it first. ``docs/openai-fields.md`` is generated from this table
(``python -m tokenmill.api.fields > docs/openai-fields.md``; a test checks it is current).

Fields a request model declares beyond these (vLLM's extensions such as ``top_k``) are
honoured; the generated page lists them from the request models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tokenmill.api.errors import bad_request

HONOURED, NO_EFFECT, REFUSED = "honoured", "accepted, no effect", "refused (400)"


@dataclass(frozen=True)
class FieldRule:
    """One request field: its ``status``, a ``note`` for the docs, and for fields honoured only
    for some values, ``refuse(value)`` giving the reason a value is refused (None: accepted)."""

    name: str
    status: str
    note: str = ""
    refuse: Callable[[Any], str | None] | None = None


def _modalities(value) -> str | None:
    if isinstance(value, list) and any(m != "text" for m in value):
        return "only text output is supported; this server cannot produce audio (use modalities [\"text\"])."
    return None


def _verbosity(value) -> str | None:
    if value not in (None, "medium"):
        return f"verbosity {value!r} cannot be honoured: this model has no verbosity control."
    return None


_COMMON = [
    FieldRule("model", HONOURED, "must name a served model (404 otherwise); may be omitted"),
    FieldRule("frequency_penalty", HONOURED),
    FieldRule("presence_penalty", HONOURED),
    FieldRule("logit_bias", HONOURED, "token id (string) to bias in [-100, 100]"),
    FieldRule("max_tokens", HONOURED),
    FieldRule("n", HONOURED),
    FieldRule("seed", HONOURED, "per-request generator: same seed, same output"),
    FieldRule("stop", HONOURED),
    FieldRule("stream", HONOURED),
    FieldRule("stream_options", HONOURED, "include_usage (and vLLM's continuous_usage_stats)"),
    FieldRule("temperature", HONOURED),
    FieldRule("top_p", HONOURED),
    FieldRule("user", NO_EFFECT, "not used"),
]

CHAT_FIELDS: list[FieldRule] = [
    FieldRule("messages", HONOURED, "system, user, assistant (with tool_calls) and tool messages; text content "
                                    "parts only"),
    *_COMMON,
    FieldRule("logprobs", HONOURED),
    FieldRule("top_logprobs", HONOURED, "0 to 20"),
    FieldRule("max_completion_tokens", HONOURED, "takes precedence over max_tokens"),
    FieldRule("response_format", HONOURED, "text, json_object, json_schema (strict or not: the output follows "
                                           "the schema), and vLLM's structural_tag"),
    FieldRule("tools", HONOURED, "function tools, rendered by the chat template; strict: true constrains the "
                                 "calls auto makes (docs/tool-calling.md)"),
    FieldRule("tool_choice", HONOURED, "none, auto (parsed by --tool-call-parser), required and a named function "
                                       "(both grammar-constrained)"),
    FieldRule("parallel_tool_calls", HONOURED, "false: at most one call"),
    FieldRule("functions", REFUSED, "deprecated by OpenAI; send tools"),
    FieldRule("function_call", REFUSED, "deprecated by OpenAI; send tool_choice"),
    FieldRule("modalities", HONOURED, "[\"text\"] only; a list with \"audio\" is refused", _modalities),
    FieldRule("audio", REFUSED, "no audio output"),
    FieldRule("web_search_options", REFUSED, "no web search"),
    FieldRule("reasoning_effort", REFUSED, "the served models do not reason (OpenAI refuses it for such models too)"),
    FieldRule("verbosity", HONOURED, "only \"medium\" (the default); other values are refused", _verbosity),
    FieldRule("prediction", NO_EFFECT, "predicted outputs only make OpenAI faster; the output is the same"),
    FieldRule("store", HONOURED, "kept in SQLite with `serve --store PATH` (list, retrieve, update, delete, "
                                 "messages); without a store, store: true is a 400 (store_disabled)"),
    FieldRule("metadata", HONOURED, "kept with a stored completion (list filters on it); else no effect"),
    FieldRule("service_tier", NO_EFFECT, "one tier"),
    FieldRule("prompt_cache_key", NO_EFFECT, "prefix caching is automatic (vLLM's cache_salt isolates tenants)"),
    FieldRule("safety_identifier", NO_EFFECT, "not used"),
]

COMPLETION_FIELDS: list[FieldRule] = [
    FieldRule("prompt", HONOURED, "a string, a list of strings, token ids or lists of token ids"),
    *_COMMON,
    FieldRule("logprobs", HONOURED, "0 to 20"),
    FieldRule("echo", HONOURED, "with logprobs, the prompt's logprobs too"),
    FieldRule("best_of", HONOURED, "n to 20: generates best_of, returns the n of highest cumulative logprob; "
                                   "not with stream"),
    FieldRule("suffix", HONOURED, "fill-in-the-middle where the tokenizer has FIM tokens (StarCoder, "
                                  "Qwen2.5-Coder, DeepSeek-Coder, Codestral); else a 400 naming suffix"),
]

def _when_true(reason: str) -> Callable[[Any], str | None]:
    return lambda value: reason if value else None


#: vLLM's request extensions that change the output and that we do not implement: a client written
#: for vLLM gets a 400 naming the field rather than a silent 200 (both endpoints).
VLLM_FIELDS: list[FieldRule] = [
    FieldRule("use_beam_search", REFUSED, "no beam search; true is refused (best_of and n sample instead)",
              _when_true("use_beam_search cannot be honoured: this server has no beam search.")),
    FieldRule("length_penalty", NO_EFFECT, "used only by beam search, which is refused"),
    FieldRule("allowed_token_ids", REFUSED, "not implemented; structured_outputs (choice, regex) or logit_bias "
                                            "restrict the output"),
    FieldRule("bad_words", REFUSED, "not implemented"),
    FieldRule("logits_processors", REFUSED, "no custom logits processors"),
    FieldRule("truncate_prompt_tokens", REFUSED, "prompts are never truncated (too long a prompt is a 400)"),
    FieldRule("return_tokens_as_token_ids", REFUSED, "tokens are returned as text; true is refused",
              _when_true("return_tokens_as_token_ids cannot be honoured: logprobs carry token text.")),
    FieldRule("prompt_embeds", REFUSED, "prompts are text or token ids"),
]

TABLES = {"chat.completions": CHAT_FIELDS, "completions": COMPLETION_FIELDS}


def _value(req, name: str):
    if name in type(req).model_fields:
        return getattr(req, name)
    return (req.model_extra or {}).get(name)


def check_fields(req, endpoint: str) -> None:
    """Raise a 400 naming the field if the request sets a field (or a value) we cannot honour."""
    for rule in TABLES[endpoint] + VLLM_FIELDS:
        if rule.status == NO_EFFECT or (rule.status == HONOURED and rule.refuse is None):
            continue
        value = _value(req, rule.name)
        if value is None:
            continue
        reason = rule.refuse(value) if rule.refuse is not None else \
            f"{rule.name} cannot be honoured by this server: {rule.note}."
        if reason:
            raise bad_request(reason if reason.startswith(rule.name) else f"{rule.name}: {reason}", rule.name,
                              "unsupported_parameter")


# -- the generated page ---------------------------------------------------------------------------------
def _extensions(endpoint: str) -> list[str]:
    from tokenmill.api.protocol import ChatCompletionRequest, CompletionRequest

    model = ChatCompletionRequest if endpoint == "chat.completions" else CompletionRequest
    listed = {r.name for r in TABLES[endpoint]}
    return sorted(n for n in model.model_fields if n not in listed)


def render_markdown() -> str:
    """``docs/openai-fields.md``."""
    lines = ["# OpenAI request fields", "",
             "<!-- generated by `python -m tokenmill.api.fields > docs/openai-fields.md`; "
             "tests/test_api_fields.py checks it is current -->", "",
             "Every field of OpenAI's request bodies, and what tokenmill does with it. A field that would",
             "change the output but cannot be honoured is refused with a 400 naming it "
             "(`code: unsupported_parameter`),",
             "never ignored. Fields that do not change the output are accepted. Unknown fields are logged",
             "and ignored.", ""]
    for endpoint, title in (("chat.completions", "POST /v1/chat/completions"), ("completions", "POST /v1/completions")):
        lines += [f"## `{title}`", "", "| field | status | notes |", "|---|---|---|"]
        for r in TABLES[endpoint]:
            note = r.note.replace("|", "\\|")
            lines.append(f"| `{r.name}` | {r.status} | {note} |")
        ext = _extensions(endpoint)
        lines += ["", "Also honoured (vLLM's extensions): " + ", ".join(f"`{n}`" for n in ext) + ".", ""]
    from tokenmill.guided.params import REQUEST_FIELDS

    lines += ["`structured_outputs` (both endpoints; see [structured-output.md](structured-output.md)) takes "
              "exactly one constraint and these options; any other sub-field is a 400 naming it:", "",
              "| sub-field | effect |", "|---|---|"]
    lines += [f"| `{name}` | {note} |" for name, note in REQUEST_FIELDS.items()]
    lines += ["", "`guided_whitespace_pattern` is `structured_outputs.whitespace_pattern` for the constraint the "
              "request sets otherwise (response_format or a guided_* field).", ""]
    lines += ["## vLLM extensions not implemented (both endpoints)", "",
              "A client written for vLLM that sets one of these gets a 400 naming it, not a silent 200.", "",
              "| field | status | notes |", "|---|---|---|"]
    for r in VLLM_FIELDS:
        lines.append(f"| `{r.name}` | {r.status} | {r.note} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
