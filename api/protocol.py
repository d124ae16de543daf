"""OpenAI request bodies (plus vLLM's extra sampling fields), as pydantic models.

Only types are checked here; value ranges are checked by
:class:`tokenmill.sampling_params.SamplingParams` so that the server and the offline API
agree. Unknown fields are kept (``extra="allow"``) so the server can log and ignore them.
Every request body derives from :class:`APIRequest`, which refuses strings that are not
valid Unicode (lone surrogate escapes such as ``"\\ud800"``) wherever they occur.
"""
from __future__ import annotations

import re
from array import array
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from tokenmill.guided.params import StructuredOutputsParams
from tokenmill.sampling_params import SamplingParams


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_text(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def find_lone_surrogate(data: Any) -> tuple | None:
    """The path (keys and indexes) of the first string, value or key, in decoded JSON ``data``
    that holds a lone surrogate, or None. JSON's ``\\uXXXX`` escapes (and Python's json
    module) let them through, but no tokenizer, encoder or log can take them.

    This runs on the event loop for every body, so the common cases stay in C: ``isascii``
    on text, ``join`` on a list of texts, ``array`` on a list of token ids (each refuses
    anything else)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            if _bad_text(obj):
                return path
        elif isinstance(obj, dict):
            for k in obj:
                if isinstance(k, str) and _bad_text(k):
                    return (*path, k)
            stack.extend((v, (*path, k)) for k, v in reversed(obj.items()) if isinstance(v, (str, list, dict)))
        elif isinstance(obj, list):
            try:
                if not _bad_text("".join(obj)):
                    continue  # strings only, all valid
            except TypeError:
                try:
                    array("q", obj)
                    continue  # integers only
                except (TypeError, OverflowError):
                    pass
            stack.extend((obj[i], (*path, i)) for i in range(len(obj) - 1, -1, -1)
                         if isinstance(obj[i], (str, list, dict)))
    return None


class APIRequest(BaseModel):
    """Base of every request body: extra fields kept, and no invalid Unicode anywhere.

    A lone surrogate is refused as a ``lone_surrogate`` validation error whose context
    names the top-level field (``param``) and the full path (``where``).
    """

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = find_lone_surrogate(data)
        if path is not None:
            # The path itself may hold the bad key: escape it, or the error could not be rendered either.
            names = [str(p).encode("utf-8", "backslashreplace").decode() for p in path]
            raise PydanticCustomError(
                "lone_surrogate", "{where}: the text contains a lone surrogate (\\ud800-\\udfff), which is not "
                "valid Unicode; send UTF-8 text",
                {"where": ".".join(names) or "body", "param": names[0] if path and isinstance(path[0], str) else None})
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(APIRequest):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    echo: bool = False
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    cache_salt: str | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def max_tokens_param(self) -> str:
        """The field the generation limit came from (errors about it name that field)."""
        return "max_tokens"

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                defaults: dict | None = None, n: int | None = None) -> SamplingParams:
        """Raises ValueError (naming the field) for out-of-range values.

        ``defaults`` are the model's sampling defaults (its generation_config.json), used for
        fields the request leaves out, as vLLM does; then the OpenAI defaults apply.
        """
        d = defaults or {}
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            # torch generators take 64-bit seeds; a bigger one would fail inside the engine's step.
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}.")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("cache_salt must be a non-empty string, got ''.")
        return SamplingParams(
            n=self.n if n is None else n,
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, d.get("repetition_penalty", 1.0)),
            temperature=_or(self.temperature, d.get("temperature", 1.0)),
            top_p=_or(self.top_p, d.get("top_p", 1.0)),
            top_k=_or(self.top_k, d.get("top_k", 0)),
            min_p=_or(self.min_p, d.get("min_p", 0.0)),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias=self.logit_bias,
            structured_outputs=self.structured_outputs_params(),
        )

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever one of ``response_format``,
        ``structured_outputs`` or the ``guided_*`` fields it uses. Raises GuidedSpecError
        (a ValueError whose ``param`` names the field) for a malformed or ambiguous one."""
        from tokenmill.guided.interface import GuidedSpecError

        found: list[StructuredOutputsParams] = []
        from tokenmill.guided.params import BACKEND_CHOICES, REQUEST_FIELDS

        backend = self.guided_decoding_backend
        if backend is not None and backend not in BACKEND_CHOICES:
            raise GuidedSpecError(f"guided_decoding_backend must be one of {', '.join(BACKEND_CHOICES)}, "
                                  f"got {backend!r}", "guided_decoding_backend")
        # vLLM's older alias of structured_outputs.whitespace_pattern; it applies to whichever JSON constraint is set
        wp = self.guided_whitespace_pattern
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                found.append(StructuredOutputsParams(json_object=True, backend=backend, whitespace_pattern=wp,
                                                     param="response_format"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or js.get("schema") is None:
                    raise GuidedSpecError("response_format.json_schema.schema is required for type json_schema",
                                          "response_format")
                # strict or not, the output follows the schema (strict=false merely allows that)
                found.append(StructuredOutputsParams(json=js["schema"], backend=backend, whitespace_pattern=wp,
                                                     param="response_format.json_schema.schema"))
            elif kind == "structural_tag":  # vLLM's: {"structures", "triggers"}, or xgrammar's {"format"}
                found.append(StructuredOutputsParams(structural_tag={k: v for k, v in rf.items()}, backend=backend,
                                                     whitespace_pattern=wp, param="response_format"))
            elif kind != "text":
                raise GuidedSpecError(f"response_format.type must be text, json_object, json_schema or "
                                      f"structural_tag, got {kind!r}", "response_format")
        if self.structured_outputs is not None:
            fields = dict(self.structured_outputs)
            unknown = sorted(set(fields) - set(REQUEST_FIELDS))
            if unknown:
                raise GuidedSpecError(f"structured_outputs has unsupported field(s): {', '.join(unknown)}",
                                      "structured_outputs")
            fields = {k: v for k, v in fields.items() if v is not None}  # a null means the default, as in vLLM
            if wp is not None:
                if fields.get("whitespace_pattern") is not None:
                    raise GuidedSpecError("set only one of guided_whitespace_pattern and "
                                          "structured_outputs.whitespace_pattern", "guided_whitespace_pattern")
                fields["whitespace_pattern"] = wp
            fields.setdefault("backend", backend)
            found.append(StructuredOutputsParams(**fields))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append(StructuredOutputsParams(**{kind: value}, backend=backend, whitespace_pattern=wp, param=name))
        if len(found) > 1:
            raise GuidedSpecError("set only one of response_format, structured_outputs and the guided_* fields, "
                                  f"got {', '.join(f.param.split('.')[0] for f in found)}", found[1].param)
        if wp is not None and not found:
            raise GuidedSpecError("guided_whitespace_pattern needs a JSON constraint (response_format, guided_json "
                                  "or structured_outputs)", "guided_whitespace_pattern")
        return found[0] if found else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage
                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


def _or(value, default):
    return default if value is None else value


#: Largest ``best_of`` (OpenAI's bound): each is a whole continuation generated and thrown away.
MAX_BEST_OF = 20


def _prompt_kind(value: Any) -> str:
    """Which prompt form a value is, judged by its first element: validating a 2M-id list
    against every member of the union would cost seconds (and an error per element)."""
    if not isinstance(value, list) or not value:
        return "ids" if isinstance(value, list) else "text"
    first = value[0]
    return "texts" if isinstance(first, str) else "batch_ids" if isinstance(first, list) else "ids"


TokenIds = Annotated[list[int], Field(fail_fast=True)]
PromptType = Annotated[Union[Annotated[str, Tag("text")],
                             Annotated[list[str], Field(fail_fast=True), Tag("texts")],
                             Annotated[TokenIds, Tag("ids")],
                             Annotated[list[TokenIds], Field(fail_fast=True), Tag("batch_ids")]],
                       Discriminator(_prompt_kind)]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: PromptType
    max_tokens: int | None = 16
    max_completion_tokens: int | None = None  # chat's name; some load generators send it here too
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        """With ``best_of`` > n the engine generates ``best_of`` continuations (the API keeps the
        n best by cumulative logprob), so the params ask for ``best_of`` and for logprobs."""
        n, logprobs = self.n, self.logprobs
        if self.best_of is not None:
            if not isinstance(self.best_of, int) or not self.n <= self.best_of <= MAX_BEST_OF:
                raise ValueError(f"best_of must be an integer in [n, {MAX_BEST_OF}] (n is {self.n}), "
                                 f"got {self.best_of}.")
            if self.best_of > self.n:
                if self.stream:
                    raise ValueError("best_of greater than n cannot be streamed (the best are known only at the "
                                     "end); set stream to false.")
                n, logprobs = self.best_of, 0 if logprobs is None else logprobs
        prompt_lp = self.prompt_logprobs
        if prompt_lp is None and self.echo and self.logprobs is not None:
            prompt_lp = self.logprobs  # echo + logprobs also scores the prompt (lm-eval's loglikelihood)
        max_tokens = self.max_completion_tokens if self.max_tokens_param == "max_completion_tokens" else self.max_tokens
        return self._params(max_tokens, logprobs, prompt_lp, defaults, n=n)

    @property
    def picks_best(self) -> bool:
        """The engine generates ``best_of`` > n continuations and the response keeps the n best."""
        return self.best_of is not None and self.best_of > self.n

    @property
    def max_tokens_param(self) -> str:
        if "max_tokens" not in self.model_fields_set and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # tool calling (checked by tokenmill.guided.tools)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    #: Keep the completion for the stored-completions endpoints (``serve --store PATH``).
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}.")
            if not self.logprobs and self.top_logprobs > 0:
                raise ValueError("top_logprobs requires logprobs to be true.")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs, self.prompt_logprobs, defaults)

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def conversation(self) -> list[dict]:
        """The messages as plain dicts for the chat template; text parts are joined."""
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}.")
                    texts.append(part["text"])
                content = "\n".join(texts)
            d = {**(m.model_extra or {}), "role": m.role, "content": content or ""}
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out


class TokenizeRequest(APIRequest):
    """``POST /tokenize``: a ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None  # rendered with the messages, as chat completions does


class DetokenizeRequest(APIRequest):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: TokenIds

