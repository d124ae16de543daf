"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Each step the scheduler first gives every running sequence its next tokens (one for a
decode, the rest of the prompt, or a budget-sized chunk, for a prefill in progress),
then admits waiting sequences while the token budget, ``max_num_seqs`` and the KV pool
allow. When the pool runs dry for a running sequence, the newest running sequence is
preempted: its blocks are freed and it goes back to the head of the waiting queue to be
recomputed later, or, with ``preemption_mode="swap"``, its computed blocks are first copied
to host slots (:mod:`tokenmill.kv.swap_space`) and copied back into fresh blocks when it
resumes, so nothing is recomputed (a full swap space falls back to recompute). Works on ids
and counts only; never imports torch.

Progress is guaranteed for any load whose every single sequence fits the pool (the engine
refuses others at admission): a waiting sequence holds no blocks (its cached prefix is
attached only when it is admitted, and only if the whole step's share fits), so preempting
the newest running sequences always frees enough for the oldest one to advance.

A step's counts advance when it is scheduled (``num_scheduled``, ``num_pending``) and its
results land when :meth:`Scheduler.update` applies them (``num_computed``, ``token_ids``), so
the next step can be scheduled while one runs (overlap): a sequence whose token is still
being sampled decodes that token next, and the runner fills it in from its own sample.
"""
from __future__ import annotations

from collections import deque

from tokenmill.engine.batch import NewSeq, RunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.config import SchedulerConfig
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.swap_space import SwapSpace
from tokenmill.engine.sequence import FinishReason, Sequence, SeqStatus, new_seq_id


def _first_change(table: list[int], sent: list[int]) -> int:
    """Index of the first block where ``table`` differs from what the runner holds (``sent``)."""
    n = min(len(table), len(sent))
    if table[:n] == sent[:n]:
        return n
    return next(i for i in range(n) if table[i] != sent[i])


def _pools(seq: Sequence) -> bool:
    """An embedding request: it neither reads nor fills the prefix cache."""
    return getattr(seq.params, "pooling", None) is not None


class Scheduler:
    """Decides, each step, which sequences run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 swap: SwapSpace | None = None):
        if (config.preemption_mode == "swap") != (swap is not None):
            raise ValueError(f"preemption_mode {config.preemption_mode!r} needs a swap space exactly in swap mode")
        self.config = config
        self.kv = kv
        #: Host slots of swapped-out sequences (swap mode), else None.
        self.swap = swap
        self._swap_out: list[tuple[int, int]] = []
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: dict[int, Sequence] = {}
        self._fork_tables: dict[int, list[int]] = {}
        self._finished: list[int] = []
        self.num_preemptions = 0
        #: Prompt tokens handed to the model (the rest came from the prefix cache).
        self.num_prompt_tokens_computed = 0
        # First-block keys the latest plan computes, until update() applies it: with overlap the
        # next plan is made before then, and must not recompute those blocks either.
        self._unapplied_keys: set = set()
        self._unapplied_plan: SchedulerOutput | None = None

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def live(self, seq_id: int) -> Sequence | None:
        """The live sequence with this id (None once it finished or was never known)."""
        return self._live.get(seq_id)

    def requeue_finished(self, seq_ids: list[int]) -> None:
        """Finished ids from a plan that never reached the runner: send them with the next plan."""
        self._finished.extend(seq_ids)

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
        if reason is not FinishReason.ABORT and seq.num_computed and not _pools(seq):
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed, seq.salt)
        self.kv.free(seq.seq_id)
        if self.swap is not None:
            self.swap.discard(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._live.pop(seq.seq_id, None)
        if seq.in_runner:
            self._finished.append(seq.seq_id)
        self._finished.extend(seq.forking)  # children the runner made from a sample now dropped
        seq.forking = []
        self._fork_tables.pop(seq.seq_id, None)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        # A token still in flight would land in the runner's copy but not here: recompute then.
        if self.swap is not None and not seq.num_pending and not seq.forking:
            pairs = self.swap.swap_out(self.kv, seq.seq_id, seq.num_computed)
            if pairs is not None:
                self._swap_out.extend(pairs)
                # The runner keeps its state (tokens, generator, grammar) and its stale table,
                # which the next step's block-table change replaces.
                seq.num_scheduled = seq.num_computed
                seq.status = SeqStatus.WAITING
                seq.num_preemptions += 1
                self.num_preemptions += 1
                self.waiting.appendleft(seq)
                return
        self.kv.free(seq.seq_id)
        seq.num_computed = seq.num_scheduled = seq.num_pending = 0
        seq.status = SeqStatus.WAITING
        seq.in_runner = False  # sent again in full when it runs again; the runner keeps its generator
        seq.runner_blocks = []
        if seq.forking:  # the forking sample is discarded: fork again from the next one
            self._finished.extend(seq.forking)
            seq.pending_forks += len(seq.forking)
            seq.forking = []
            self._fork_tables.pop(seq.seq_id, None)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        new_seqs: list[NewSeq] = []
        copies: list[tuple[int, int]] = []
        prompt_starts: list[tuple[Sequence, int]] = []
        preempted = 0

        queue = [s for s in self.running if not self._done_when_pending_lands(s)]
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens + seq.num_pending - seq.num_scheduled, budget)
            if num_new <= 0:
                continue
            while True:
                got = self.kv.allocate(seq.seq_id, seq.num_scheduled, num_new)
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
            if seq.num_scheduled < seq.num_prompt_tokens:
                prompt_starts.append((seq, seq.num_scheduled))
            scheduled.append(self._scheduled(seq, num_new, new_seqs))
            budget -= num_new

        # Blocks being computed this step, so that a waiting sequence that would compute the
        # same block (a shared prefix nobody has cached yet) waits one step and reuses it instead.
        inflight = {self._next_block_key(seq, start) for seq, start in prompt_starts}
        earlier = self._unapplied_keys
        admitted = []
        swap_in: list[tuple[int, int]] = []
        # A step that swapped out admits nothing, so no step both copies blocks out and in.
        for seq in list(self.waiting) if not preempted else []:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self.swap is not None and self.swap.holds(seq.seq_id):
                remaining = seq.num_tokens - seq.num_computed
                num_new = min(remaining, budget)
                cost = self.swap.swap_in_cost(self.kv, seq.seq_id, seq.num_computed + num_new)
                if cost > self.kv.num_free_blocks:
                    if not self.running and not scheduled:
                        raise RuntimeError(f"KV cache too small: {self.kv.num_blocks} blocks of "
                                           f"{self.kv.block_size} tokens cannot hold one sequence of "
                                           f"{seq.num_tokens} tokens")
                    break
                pairs = self.swap.swap_in(self.kv, seq.seq_id, seq.num_computed)
                assert pairs is not None, "swap_in_cost promised blocks that swap_in could not find"
                swap_in.extend(pairs)
                got = self.kv.allocate(seq.seq_id, seq.num_scheduled, num_new)
                assert got is not None, "swap_in_cost promised blocks that allocate could not find"
                copies.extend(got)
                admitted.append(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                scheduled.append(self._scheduled(seq, num_new, new_seqs))
                budget -= num_new
                continue
            # A waiting sequence holds no blocks: its cached prefix is attached only once it is sure
            # to be admitted, so the waiting queue can never pin the pool that running ones need.
            use_prefix = not self._needs_every_position(seq)
            hit = self.kv.admission_cost(seq.token_ids, seq.salt, 0, use_prefix)[0]
            # A hit that ends inside a block is a prompt cached whole: it computes only its copied
            # last token, so it neither waits for nor holds back anyone.
            computes_block = hit % self.kv.block_size == 0
            if (inflight or earlier) and self.kv.enable_prefix_caching and use_prefix and computes_block:
                key = self._next_block_key(seq, hit)
                if key in inflight or key in earlier:
                    continue
            remaining = seq.num_tokens - hit
            num_new = min(remaining, budget)
            # Without chunked prefill a prompt runs in one step (admission refused longer ones); a
            # recompute after preemption (prompt plus output) may still be chunked, so it progresses.
            if num_new < remaining and not (self.config.enable_chunked_prefill or seq.num_preemptions):
                break
            _, cost = self.kv.admission_cost(seq.token_ids, seq.salt, hit + num_new, use_prefix)
            if cost > self.kv.num_free_blocks:
                if not self.running and not scheduled:
                    raise RuntimeError(f"KV cache too small: {self.kv.num_blocks} blocks of {self.kv.block_size} "
                                       f"tokens cannot hold one sequence of {seq.num_tokens} tokens")
                break  # first come, first served: later (smaller) sequences do not overtake it
            seq.num_computed = self.kv.match_prefix(seq.seq_id, seq.token_ids, seq.salt) if use_prefix else 0
            seq.num_scheduled = seq.num_computed
            if not seq.num_preemptions:
                seq.num_cached_tokens = seq.num_computed
            got = self.kv.allocate(seq.seq_id, seq.num_scheduled, num_new)
            assert got is not None, "admission_cost promised blocks that allocate could not find"
            admitted.append(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            copies.extend(got)
            if computes_block:
                inflight.add(self._next_block_key(seq, seq.num_scheduled))
            scheduled.append(self._scheduled(seq, num_new, new_seqs))
            budget -= num_new
        if admitted:
            chosen = set(map(id, admitted))
            self.waiting = deque(s for s in self.waiting if id(s) not in chosen)

        finished, self._finished = self._finished, []
        swap_out, self._swap_out = self._swap_out, []
        out = SchedulerOutput(scheduled, sum(item.num_new for item in scheduled), new_seqs, copies, finished,
                              preempted, swap_out=swap_out, swap_in=swap_in)
        self._unapplied_keys, self._unapplied_plan = inflight, out
        return out

    def _done_when_pending_lands(self, seq: Sequence) -> bool:
        """A token in flight will end ``seq`` by length: scheduling it again would be wasted."""
        if not seq.num_pending:
            return False
        return (seq.num_output_tokens + seq.num_pending >= seq.max_tokens
                or seq.num_tokens + seq.num_pending >= self.max_model_len)

    def _next_block_key(self, seq: Sequence, start: int) -> tuple:
        """Identifies the first block ``seq`` computes from ``start`` (position and contents)."""
        bs = self.kv.block_size
        first = start - start % bs
        return seq.salt, first, tuple(seq.token_ids[first:first + bs])

    def _needs_every_position(self, seq: Sequence) -> bool:
        """Prompt logprobs and pooling read every prompt position's hidden state: no prefix cache."""
        return self._needs_prompt_logprobs(seq) or _pools(seq)

    def _needs_prompt_logprobs(self, seq: Sequence) -> bool:
        return getattr(seq.params, "prompt_logprobs", None) is not None and seq.num_output_tokens == 0

    def _scheduled(self, seq: Sequence, num_new: int, new_seqs: list[NewSeq]) -> ScheduledSeq:
        """The step message's entry for ``seq`` (and its NewSeq if the runner lacks it); advances its counts."""
        start = seq.num_scheduled
        if not seq.in_runner:
            new_seqs.append(NewSeq(seq.seq_id, seq.request_id, seq.index, list(seq.token_ids),
                                   seq.num_prompt_tokens, seq.params, seq.eos_token_id))
            seq.in_runner = True
            seq.runner_blocks = []
        table = self.kv.block_table(seq.seq_id)
        frm = _first_change(table, seq.runner_blocks)
        seq.runner_blocks = table
        sample = start + num_new == seq.num_tokens + seq.num_pending and seq.max_tokens > 0
        children = []
        if sample and seq.pending_forks:
            children = [new_seq_id() for _ in range(seq.pending_forks)]
            seq.forking, seq.pending_forks = list(children), 0
            self._fork_tables[seq.seq_id] = table  # the children start from the runner's copy of it
        self.num_prompt_tokens_computed += max(0, min(start + num_new, seq.num_prompt_tokens) - start)
        seq.num_scheduled += num_new
        if sample:
            seq.num_pending += 1
        return ScheduledSeq(
            seq_id=seq.seq_id, start=start, num_new=num_new, sample=sample, num_samples=1 + len(children),
            prompt_logprobs=self._needs_prompt_logprobs(seq), blocks_from=frm, new_blocks=table[frm:],
            child_seq_ids=children,
        )

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[tuple[Sequence, int, bool]]:
        """Apply a step's results: advance counts, append sampled tokens, fork, finish.

        Returns ``(seq, first_new, forked)`` for every sequence touched: its tokens from
        ``first_new`` on are new this step; ``forked`` marks a child created by this step. Entries of sequences that finished or were preempted since the
        step was scheduled are skipped (their results are stale).
        """
        if out is self._unapplied_plan:
            self._unapplied_keys, self._unapplied_plan = set(), None
        touched = []
        for item in out.seqs:
            seq = self._live.get(item.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING or item.start + item.num_new > seq.num_scheduled:
                continue
            seq.num_computed = item.start + item.num_new
            first_new = seq.num_tokens
            touched.append((seq, first_new, False))
            tokens = result.sampled.get(seq.seq_id)
            if item.sample:
                seq.num_pending -= 1
            if not tokens:
                if not _pools(seq):
                    self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed, seq.salt)
                if seq.max_tokens == 0 and seq.num_computed >= seq.num_tokens:
                    self.finish(seq, FinishReason.LENGTH)  # scoring only: the prompt is all it wanted
                continue
            logprobs = result.logprobs.get(seq.seq_id)
            fork_table = self._fork_tables.pop(seq.seq_id, [])
            for i, (token, child_id) in enumerate(zip(tokens[1:], item.child_seq_ids), start=1):
                child = seq.fork(seq.index + i, child_id, seq.num_computed)
                child.in_runner, child.runner_blocks = True, list(fork_table)
                self.kv.fork(seq.seq_id, child.seq_id)
                self.running.append(child)
                self._live[child.seq_id] = child
                self._append(child, token, logprobs[i] if logprobs else None)
                touched.append((child, child.num_prompt_tokens, True))
            if item.child_seq_ids:
                seq.forking = []
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
