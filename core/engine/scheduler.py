"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Each step the scheduler first gives every running sequence its next tokens (one for a
decode, the rest of the prompt, or a budget-sized chunk, for a prefill in progress),
then admits waiting sequences while the token budget, ``max_num_seqs`` and the KV pool
allow. When the pool runs dry for a running sequence, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the waiting queue to be
recomputed later. Works on ids and counts only; never imports torch.
"""
from __future__ import annotations

from collections import deque

from tokenmill.engine.batch import RunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.config import SchedulerConfig
from tokenmill.kv.manager import KVCacheManager
from tokenmill.engine.sequence import FinishReason, Sequence, SeqStatus


class Scheduler:
    """Decides, each step, which sequences run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._finished: list[tuple[str, int]] = []
        self.num_preemptions = 0

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of ``request_id`` and free its blocks; returns them."""
        hit = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in hit:
            self.finish(seq, FinishReason.ABORT)
        return hit

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None) -> None:
        """End ``seq``: cache its full blocks for reuse, free the rest."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if reason is not FinishReason.ABORT and seq.num_computed:
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed, seq.salt)
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._finished.append((seq.request_id, seq.index))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.prefix_matched = False
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        preempted = 0

        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            while True:
                got = self.kv.allocate(seq.seq_id, seq.num_computed, num_new)
                if got is not None:
                    break
                victim = self.running[-1]  # newest first
                if victim in queue:
                    queue.remove(victim)
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if got is None:
                continue
            copies.extend(got)
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new

        # Blocks being computed this step, so that a waiting sequence that would compute the
        # same block (a shared prefix nobody has cached yet) waits one step and reuses it instead.
        inflight = {self._next_block_key(item.seq, item.start) for item in scheduled if item.start < item.seq.num_prompt_tokens}
        admitted = []
        for seq in list(self.waiting) if not preempted else []:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not seq.prefix_matched:
                if inflight and self.kv.enable_prefix_caching and not self._needs_prompt_logprobs(seq):
                    hit = self.kv.peek_prefix(seq.token_ids, seq.salt)
                    if self._next_block_key(seq, hit) in inflight:
                        continue
                seq.num_computed = 0 if self._needs_prompt_logprobs(seq) else \
                    self.kv.match_prefix(seq.seq_id, seq.token_ids, seq.salt)
                seq.prefix_matched = True
                if not seq.num_preemptions:
                    seq.num_cached_tokens = seq.num_computed
            remaining = seq.num_tokens - seq.num_computed
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            got = self.kv.allocate(seq.seq_id, seq.num_computed, num_new)
            if got is None:
                if not self.running and not scheduled:
                    raise RuntimeError(f"KV cache too small: {self.kv.num_blocks} blocks of {self.kv.block_size} "
                                       f"tokens cannot hold one sequence of {seq.num_tokens} tokens")
                break
            admitted.append(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            copies.extend(got)
            scheduled.append(self._scheduled(seq, num_new))
            inflight.add(self._next_block_key(seq, seq.num_computed))
            budget -= num_new
        if admitted:
            chosen = set(map(id, admitted))
            self.waiting = deque(s for s in self.waiting if id(s) not in chosen)

        finished, self._finished = self._finished, []
        return SchedulerOutput(scheduled, sum(s.num_new for s in scheduled), copies, finished, preempted)

    def _next_block_key(self, seq: Sequence, start: int) -> tuple:
        """Identifies the first block ``seq`` computes from ``start`` (position and contents)."""
        bs = self.kv.block_size
        first = start - start % bs
        return seq.salt, first, tuple(seq.token_ids[first:first + bs])

    def _needs_prompt_logprobs(self, seq: Sequence) -> bool:
        return getattr(seq.params, "prompt_logprobs", None) is not None and seq.num_output_tokens == 0

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        sample = seq.num_computed + num_new == seq.num_tokens and seq.max_tokens > 0
        return ScheduledSeq(
            seq=seq, start=seq.num_computed, num_new=num_new, block_table=self.kv.block_table(seq.seq_id),
            sample=sample, num_samples=1 + seq.pending_forks if sample else 1,
            prompt_logprobs=self._needs_prompt_logprobs(seq),
        )

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Sequence]:
        """Apply a step's results: advance counts, append sampled tokens, fork, finish. Returns touched seqs."""
        touched = []
        for item in out.seqs:
            seq = item.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed += item.num_new
            touched.append(seq)
            tokens = result.sampled.get(seq.seq_id)
            if not tokens:
                self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed, seq.salt)
                if seq.max_tokens == 0 and seq.num_computed >= seq.num_tokens:
                    self.finish(seq, FinishReason.LENGTH)  # scoring only: the prompt is all it wanted
                continue
            logprobs = result.logprobs.get(seq.seq_id)
            for i, token in enumerate(tokens[1:], start=1):
                child = seq.fork(seq.index + i)
                self.kv.fork(seq.seq_id, child.seq_id)
                self.running.append(child)
                self._append(child, token, logprobs[i] if logprobs else None)
                touched.append(child)
            seq.pending_forks = 0
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed, seq.salt)
            self._append(seq, tokens[0], logprobs[0] if logprobs else None)
        return touched

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params = seq.params
        n_out = seq.num_output_tokens
        if n_out >= getattr(params, "min_tokens", 0):
            if token in (getattr(params, "stop_token_ids", None) or ()):
                return self.finish(seq, FinishReason.STOP, token)
            if token == seq.eos_token_id and not getattr(params, "ignore_eos", False):
                return self.finish(seq, FinishReason.STOP, None)
        if n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, FinishReason.LENGTH)
