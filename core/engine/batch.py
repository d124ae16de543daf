"""The two typed objects of a step: what the scheduler sends the model runner, and what comes back.

No torch and no engine state here: ids, counts and plain lists, so a step message pickles
small and the same one can go to several ranks. The model runner keeps a persistent state
per sequence (its token ids, block table, sampling parameters, generator), keyed by
``seq_id``: a sequence's parameters and tokens travel once, in a :class:`NewSeq`, when it
first runs (or runs again after a preemption); after that each step sends only counts and
block-table changes, and the runner appends the tokens it samples to its own copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NewSeq:
    """A sequence the runner does not hold yet (first run, or rerun after a preemption).

    ``token_ids`` is everything known so far (the prompt, and after a preemption the output
    too); ``params`` the request's SamplingParams (a plain picklable dataclass). A resent
    sequence replaces the runner's copy but keeps its seeded generator.
    """

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: Any
    eos_token_id: int | None = None


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute ``num_new`` tokens from position ``start``.

    The block table changes as ``table[blocks_from:] = new_blocks`` (an append, a
    copy-on-write replacement, or the whole table for a new sequence); most decode steps
    send none. ``sample`` is true when this chunk reaches the end of the known tokens, so the
    next token is sampled; ``num_samples`` > 1 when the sequence forks (n > 1), and then
    ``child_seq_ids`` names the children the runner creates from samples 1.. (each starts as
    a copy of this sequence's tokens and table, plus its own sample). ``prompt_logprobs``
    asks for the logprobs of the prompt tokens this chunk covers.
    """

    seq_id: int
    start: int
    num_new: int
    sample: bool
    num_samples: int = 1
    prompt_logprobs: bool = False
    blocks_from: int = 0
    new_blocks: list[int] = field(default_factory=list)
    child_seq_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """The scheduler's decision for one step (the one object the model runner receives).

    ``new_seqs`` come first: the runner registers them before it reads ``seqs``.
    ``finished`` lists the sequences that ended since the last step (the runner drops
    their state). Before the forward, in this order, every rank copies: ``swap_out``
    ``(device_block, host_slot)`` pairs to its host swap space (blocks of sequences
    preempted by swap this step, which may be handed out again in the same step), then
    ``block_copies`` ``(src, dst)`` (copy-on-write), then ``swap_in`` ``(host_slot,
    device_block)`` pairs back (sequences resuming this step). A step that only swaps out
    (no ``seqs``) is still executed. No step both swaps out and in.
    """

    seqs: list[ScheduledSeq]
    num_tokens: int
    new_seqs: list[NewSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    num_preempted: int = 0
    step_id: int = 0
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

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
    ``prompt_logprobs[seq_id]`` the prompt positions covered this step (``None`` for the first token);
    ``pooled[seq_id]`` the pooled final hidden state (floats) of a pooling sequence whose prompt
    finished this step (its ``params.pooling`` says how; it samples nothing).

    Structured output: ``guided_done`` lists the sequences whose grammar terminated with this
    step's token (they must end); ``jump[seq_id]`` replaces the sampled token: that token and
    the grammar's forced continuation, tokenized together canonically (with jump-forward all of it,
    which the next step computes as one chunk; else its first token).
    """

    sampled: dict[int, list[int]] = field(default_factory=dict)
    guided_done: list[int] = field(default_factory=list)
    jump: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprobs | None]] = field(default_factory=dict)
    pooled: dict[int, list[float]] = field(default_factory=dict)
    forward_seconds: float = 0.0
