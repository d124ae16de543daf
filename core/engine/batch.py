"""The two typed objects of a step: what the scheduler sends the model runner, and what comes back.

No torch here: ids, counts and plain lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.sequence import Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute ``num_new`` tokens from position ``start``.

    ``sample`` is true when this chunk reaches the end of the known tokens, so the next
    token is sampled; ``num_samples`` > 1 when the sequence is about to fork (n > 1).
    ``prompt_logprobs`` asks the runner for the logprobs of the prompt tokens this chunk covers.
    """

    seq: Sequence
    start: int
    num_new: int
    block_table: list[int]
    sample: bool
    num_samples: int = 1
    prompt_logprobs: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start: self.start + self.num_new]


@dataclass
class SchedulerOutput:
    """The scheduler's decision for one step (the one object the model runner receives)."""

    seqs: list[ScheduledSeq]
    num_tokens: int
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    #: ``(request_id, index)`` of sequences finished since the last step (the runner drops their state).
    finished: list[tuple[str, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class TokenLogprobs:
    """Logprob of the chosen token, and the top-N alternatives as ``(token_id, logprob)``."""

    token_id: int
    logprob: float
    rank: int | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunnerOutput:
    """What the model runner returns for a step, keyed by ``seq_id``.

    ``sampled[seq_id]`` holds ``num_samples`` token ids for each sequence that sampled;
    ``logprobs[seq_id]`` the matching :class:`TokenLogprobs` when the request asked for them;
    ``prompt_logprobs[seq_id]`` the prompt positions covered this step (``None`` for the first token).
    """

    sampled: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprobs | None]] = field(default_factory=dict)
    forward_seconds: float = 0.0
