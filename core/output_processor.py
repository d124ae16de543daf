"""The frontend half of the engine: token updates in, text and vLLM-shaped outputs out.

It owns the tokenizer-side state of every request (incremental detokenizers, stop strings,
logprobs in user form). It runs where the text goes: in the ``LLM`` process offline, in
the API process under the server, so the engine core's loop never spends time on text.
When a stop string matches it asks the engine core to finish that sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.detokenizer import OutputText
from tokenmill.engine.engine_core import SeqUpdate
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass
class _SeqState:
    text: OutputText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_ids: list[int] = field(default_factory=list)
    delta_logprobs: list = field(default_factory=list)


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: object
    delta: bool
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    finished: bool = False
    pooled: list[float] | None = None


class OutputProcessor:
    """Turns :class:`SeqUpdate` lists into :class:`RequestOutput` objects.

    ``delta=True`` requests get only what is new since their last output (streaming);
    otherwise each output is cumulative.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self._token_text: dict[int, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params, delta: bool = False):
        state = _RequestState(request_id, prompt, list(prompt_token_ids), params, delta)
        for i in range(params.n):
            state.seqs[i] = _SeqState(OutputText(self.tokenizer, prompt_token_ids, params))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        self.requests[request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forget a request (its engine-side abort is the caller's business); returns its final output."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs.values():
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        state.finished = True
        return self._output(state)

    def process(self, updates: list[SeqUpdate]) -> tuple[list[RequestOutput], list[tuple[str, int, str]]]:
        """Apply one step's updates. Returns the outputs to deliver and ``(request_id, index, stop)``
        for every sequence a stop string ended, which the caller must finish in the engine core."""
        touched: dict[str, _RequestState] = {}
        stops: list[tuple[str, int, str]] = []
        for u in updates:
            state = self.requests.get(u.request_id)
            if state is None:
                continue
            state.num_cached_tokens = max(state.num_cached_tokens, u.num_cached_tokens)
            if u.pooled is not None:
                state.pooled = u.pooled
            if u.prompt_logprobs is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(self._position(lp) if lp is not None else None for lp in u.prompt_logprobs)
            seq = state.seqs.get(u.index)
            if seq is None or seq.finish_reason is not None:
                touched[u.request_id] = state
                continue
            stop_hit = None
            if u.new_token_ids:
                delta, stop_hit = seq.text.update(u.new_token_ids)
                seq.delta_text += delta
                seq.token_ids.extend(u.new_token_ids)
                seq.delta_ids.extend(u.new_token_ids)
                for lp in u.new_logprobs or []:
                    pos = self._position(lp)
                    seq.logprobs.append(pos)
                    seq.delta_logprobs.append(pos)
                    seq.cumulative_logprob += lp.logprob
            if stop_hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop_hit
                if u.finish_reason is None:
                    stops.append((u.request_id, u.index, stop_hit))
            elif u.finish_reason is not None:
                seq.delta_text += seq.text.finish()
                seq.finish_reason, seq.stop_reason = u.finish_reason, u.stop_reason
            touched[u.request_id] = state
        outputs = []
        for state in touched.values():
            state.finished = all(s.finish_reason is not None for s in state.seqs.values())
            outputs.append(self._output(state))
            if state.finished:
                del self.requests[state.request_id]
        return outputs, stops

    def _decode_token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _position(self, lp) -> dict[int, Logprob]:
        pos = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode_token(lp.token_id))}
        for rank, (tid, value) in enumerate(lp.top, start=1):
            if tid not in pos:
                pos[tid] = Logprob(value, rank, self._decode_token(tid))
        return pos

    def _output(self, state: _RequestState) -> RequestOutput:
        wants_logprobs = state.params.logprobs is not None
        outs = []
        for index, seq in sorted(state.seqs.items()):
            if state.delta:
                outs.append(CompletionOutput(index, seq.delta_text, seq.delta_ids,
                                             seq.cumulative_logprob if wants_logprobs else None,
                                             seq.delta_logprobs if wants_logprobs else None,
                                             seq.finish_reason, seq.stop_reason))
                seq.delta_text, seq.delta_ids, seq.delta_logprobs = "", [], []
            else:
                outs.append(CompletionOutput(index, seq.text.text, list(seq.token_ids),
                                             seq.cumulative_logprob if wants_logprobs else None,
                                             list(seq.logprobs) if wants_logprobs else None,
                                             seq.finish_reason, seq.stop_reason))
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, state.finished,
                             state.prompt_logprobs, state.num_cached_tokens, pooled=state.pooled)
