"""Results as users see them, shaped like vLLM's (``out.outputs[i].text`` and friends)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token's logprob, its rank in the distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per position: token id -> Logprob, holding the chosen token and the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of a request's ``n`` continuations."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    #: ``LLM.chat`` with tools (not ``none``): the parsed :class:`~tokenmill.guided.tool_parsers.ToolCall` s.
    tool_calls: list | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state: its prompt, its continuations so far, and whether it is done.

    ``num_cached_tokens`` is how many prompt tokens were served from the prefix cache;
    ``pooled`` is a pooling request's pooled final hidden state (``SamplingParams.pooling``).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    pooled: list[float] | None = None
