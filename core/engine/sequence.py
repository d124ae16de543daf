"""A sequence as the scheduler sees it: token ids and counts, never tensors."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence ended (values as the OpenAI API names them)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_ids = itertools.count()


def new_seq_id() -> int:
    """A fresh sequence id (the scheduler takes children's ids ahead of their fork)."""
    return next(_ids)


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a request.

    ``token_ids`` holds the prompt followed by the output; ``num_computed`` counts the
    positions whose KV is in the cache, ``num_scheduled`` those handed to a step (ahead of
    ``num_computed`` while a step runs), and ``num_pending`` the tokens being sampled by steps
    in flight (not yet in ``token_ids``). ``params`` is the request's SamplingParams (read
    by the model runner's sampler; the scheduler reads only the stop conditions).
    ``index`` is the position among the request's ``n`` continuations.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: Any
    max_tokens: int
    eos_token_id: int | None = None
    salt: str | None = None
    index: int = 0
    arrival: float = 0.0
    seq_id: int = field(default_factory=new_seq_id)
    num_computed: int = 0
    num_scheduled: int = 0
    num_pending: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    #: Prompt tokens served from the prefix cache at the first scheduling.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    #: Per-token logprob records appended by the engine when the request asks for them.
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    #: Children still to fork from this sequence once its prompt is computed (n > 1).
    pending_forks: int = 0
    #: Ids of the children a step in flight forks from this sequence's sample.
    forking: list[int] = field(default_factory=list)
    #: What the model runner holds of this sequence: whether it was sent, and its block table there.
    in_runner: bool = False
    runner_blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def fork(self, index: int, seq_id: int | None = None, num_computed: int | None = None) -> "Sequence":
        """A child sharing everything computed so far (its KV blocks are forked by the KV manager)."""
        child = Sequence(self.request_id, list(self.token_ids), self.num_prompt_tokens, self.params,
                         self.max_tokens, self.eos_token_id, self.salt, index, self.arrival,
                         seq_id=new_seq_id() if seq_id is None else seq_id)
        child.num_computed = child.num_scheduled = self.num_computed if num_computed is None else num_computed
        child.status = self.status
        child.logprobs = list(self.logprobs)
        return child
