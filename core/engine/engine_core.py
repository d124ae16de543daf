"""The engine core: the scheduler and the model runner, stepping on token ids.

It knows nothing of text. Each :meth:`EngineCore.step` schedules, executes and applies the
results, and returns a :class:`SeqUpdate` per sequence that produced tokens or finished.
Under the server it runs in its own process (:mod:`tokenmill.engine.core_process`); offline,
:class:`tokenmill.llm.LLM` calls it directly.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.swap_space import SwapSpace
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import FinishReason, Sequence

log = logging.getLogger(__name__)


@dataclass
class SeqUpdate:
    """What one step did to one sequence: new tokens (and logprobs), and whether it finished."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    #: A pooling request's pooled hidden state (when it finishes).
    pooled: list[float] | None = None


@dataclass
class EngineStats:
    """Counters and gauges for metrics and benchmarks."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_queries_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    #: Prompt tokens actually run through the model (the rest came from the prefix cache).
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0
    #: Swap mode: KV blocks copied to host and back, preemptions recomputed because the swap
    #: space was full, and sequences swapped out now.
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_space_full: int = 0
    num_swapped: int = 0
    #: Decode steps replayed from captured graphs (platforms declaring ``graphs``).
    graph_replays: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    @property
    def outside_forward_share(self) -> float:
        """Share of step time spent outside the model forward (scheduling, batch building, bookkeeping)."""
        return 1.0 - self.forward_seconds / self.step_seconds if self.step_seconds else 0.0


class EngineCore:
    """Owns the platform, model runner, KV cache manager and scheduler."""

    def __init__(self, config: EngineConfig, plugin_manager=None):
        from transformers import AutoConfig

        from tokenmill.executor import make_executor
        from tokenmill.plugins import get_plugin_manager

        self.config = config
        pm = plugin_manager or get_plugin_manager()
        hf_config = AutoConfig.from_pretrained(config.model.model, local_files_only=True)
        self.hf_config = hf_config
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        max_len = config.model.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {limit}")
        self.max_model_len = max_len
        #: Runs the model on every tensor-parallel rank; ``runner`` is rank 0's, in this process.
        self.executor = make_executor(config, pm)
        self.runner = self.executor.driver
        self.platform = self.runner.platform
        try:
            bs = config.cache.block_size
            max_needed = config.scheduler.max_num_seqs * math.ceil(max_len / bs) + 1
            num_blocks = self.executor.num_kv_blocks(max_needed)
            self.executor.allocate_kv_cache(num_blocks)
            swap = None
            if config.scheduler.preemption_mode == "swap":
                num_slots = self.executor.num_swap_blocks(max_needed)
                self.executor.allocate_swap_space(num_slots)
                swap = SwapSpace(num_slots, bs)
        except BaseException:
            self.executor.shutdown()
            raise
        self.kv = KVCacheManager(num_blocks, bs, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, max_len, swap)
        self.vocab_size = hf_config.vocab_size
        self.eos_token_id = hf_config.eos_token_id
        self._stats = EngineStats(num_blocks=num_blocks)
        self._seqs: dict[str, list[Sequence]] = {}
        #: Constrained requests whose grammar is still compiling (not yet given to the scheduler).
        self._compiling: list[tuple[Sequence, object]] = []
        self._rejected: list[tuple[str, str]] = []
        self._guided = None
        #: With overlap: the step launched and not yet applied, ``(plan, future)``.
        self._inflight = None
        overlap = config.scheduler.overlap
        if overlap is None:
            overlap = self.platform.capabilities.async_execution
        self._overlap = overlap and config.scheduler.preemption_mode == "recompute"
        log.info("engine: model %s on %s, %d KV blocks of %d tokens (%d tokens), backend %s, kernels %s, "
                 "preemption by %s%s", config.model.model, self.platform.name, num_blocks, bs, num_blocks * bs,
                 self.runner.backend.name, self.runner.kernels.providers, config.scheduler.preemption_mode,
                 f" ({swap.num_slots} host slots)" if swap is not None else "")

    @property
    def guided(self):
        """The structured-output runtime (compiler and matchers), built at the first constrained request."""
        if self._guided is None:
            from tokenmill.guided import GuidedCompiler, VocabInfo
            from tokenmill.guided.runtime import GuidedRuntime
            from tokenmill.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.config.model.tokenizer or self.config.model.model)
            eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
            vocab = VocabInfo(tokenizer, self.vocab_size, [e for e in eos if e is not None])
            # jump-forward rewrites rank 0's tokens in place; the other ranks only see sampled ones
            self._guided = GuidedRuntime(GuidedCompiler(vocab, self.config.guided.backend),
                                         self.config.guided.jump_forward,
                                         allow_jump=self.config.parallel.tensor_parallel_size == 1)
            self.runner.guided = self._guided
        return self._guided

    @property
    def num_kv_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    # -- requests ------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params) -> int:
        """Validate a request against the model; returns its effective ``max_tokens``. Raises ValueError."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n >= self.max_model_len and not (params.max_tokens == 0 and n <= self.max_model_len):
            raise ValueError(f"prompt is {n} tokens long, but the model's context (max_model_len) is "
                             f"{self.max_model_len} tokens")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt contains token id(s) {bad[:5]} outside the vocabulary (size {self.vocab_size})")
        params.verify_vocab(self.vocab_size)
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and n > sched.max_num_batched_tokens:
            raise ValueError(f"prompt is {n} tokens long, more than max_num_batched_tokens "
                             f"({sched.max_num_batched_tokens}) with chunked prefill disabled; enable chunked "
                             f"prefill or raise max_num_batched_tokens")
        room = self.max_model_len - n
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"max_tokens {params.max_tokens} plus the prompt's {n} tokens exceeds the model's "
                             f"context (max_model_len) of {self.max_model_len} tokens")
        max_tokens = max(1, min(room, self.num_kv_tokens - n)) if params.max_tokens is None else params.max_tokens
        # A sequence that cannot fit the whole pool on its own could never finish, even alone.
        if -(-(n + max_tokens) // self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) needs more than the whole KV "
                             f"cache ({self.num_kv_tokens} tokens); lower max_tokens or raise kv_cache_memory")
        return max_tokens

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, cache_salt: str | None = None,
                    arrival: float | None = None) -> None:
        """Queue a request (``n`` continuations fork from one prompt computation)."""
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.config.scheduler.max_waiting is not None and len(self.scheduler.waiting) >= self.config.scheduler.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.scheduler.max_waiting} requests)")
        max_tokens = self.check_request(prompt_token_ids, params)
        eos = self.eos_token_id[0] if isinstance(self.eos_token_id, list) else self.eos_token_id
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params, max_tokens,
                       eos_token_id=eos, salt=cache_salt, arrival=arrival or time.monotonic())
        seq.pending_forks = params.n - 1
        so = getattr(params, "structured_outputs", None)
        # validating and compiling happen off this thread; a spec that fails rejects the request
        handle = self.guided.compiler.submit(so.spec, so.backend, not so.disable_fallback) if so is not None else None
        if handle is not None and handle.ready and handle.error is not None:
            raise handle.future.exception()
        self._seqs[request_id] = [seq]
        if handle is None or handle.ready:
            self._admit(seq, handle)
        else:
            self._compiling.append((seq, handle))
        self._stats.prompt_tokens += len(prompt_token_ids)

    def _admit(self, seq: Sequence, handle) -> None:
        if handle is not None and handle.error is not None:
            del self._seqs[seq.request_id]
            self._rejected.append((seq.request_id, handle.error))
            return
        self.scheduler.add(seq)

    def _admit_compiled(self) -> None:
        """Hand the requests whose grammar finished compiling to the scheduler (in arrival order)."""
        if not any(h.ready for _, h in self._compiling):
            return
        still = []
        for seq, handle in self._compiling:
            if handle.ready:
                self._admit(seq, handle)
            else:
                still.append((seq, handle))
        self._compiling = still

    def pop_rejected(self) -> list[tuple[str, str]]:
        """``(request_id, reason)`` of accepted requests whose grammar failed to compile (they are gone)."""
        out, self._rejected = self._rejected, []
        return out

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free its blocks; unknown ids are ignored."""
        self._compiling = [(s, h) for s, h in self._compiling if s.request_id != request_id]
        self.scheduler.abort(request_id)
        self._seqs.pop(request_id, None)

    def abort_all(self) -> list[str]:
        """Abort every request (after a failed step); returns their ids. Frees every block they held."""
        self.drain()
        ids = list(self._seqs)
        for request_id in ids:
            self.abort(request_id)
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:  # not reachable by id: defensive
            self.scheduler.finish(seq, FinishReason.ABORT)
        return ids

    def finish_seq(self, request_id: str, index: int, stop_reason: str | None = None) -> None:
        """End one continuation early (a stop string matched in the frontend's detokenizer)."""
        for seq in self._seqs.get(request_id, []):
            if seq.index == index:
                self.scheduler.finish(seq, FinishReason.STOP, stop_reason)
        self._forget_if_done(request_id)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._seqs.get(request_id)
        if seqs and all(s.is_finished for s in seqs) and not any(s.pending_forks or s.forking for s in seqs):
            del self._seqs[request_id]

    def has_unfinished(self) -> bool:
        return bool(self._compiling) or self._inflight is not None or self.scheduler.has_unfinished()

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[SeqUpdate]:
        """Run one step; returns what it produced for the frontend.

        With overlap (the default where the platform declares ``async_execution``), the step
        that was launched by the previous call is in flight: the next plan is scheduled while it
        runs, launched as soon as it finishes, and the finished step's results are applied (and
        returned) while the next one runs. The
        scheduler's pending counts make this safe (a token in flight is decoded next, by the
        runner from its own sample; results of sequences that ended meanwhile are dropped).
        Steps whose results decide the next plan's shape (forking n>1 children, constrained
        sequences whose grammar may jump forward or end them) are applied before scheduling."""
        t0 = time.perf_counter()
        if self._compiling:
            self._admit_compiled()
        if not self._overlap:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                if plan.finished or plan.swap_out:
                    self.executor.execute(plan)  # the runner drops finished states, copies swapped-out blocks
                return []
            return self._apply(plan, self.executor.execute(plan), t0)
        if self._inflight is None:
            plan = self.scheduler.schedule()
            if plan.is_empty:
                if plan.finished:  # nothing to overlap with: deliver the finished ids now
                    self.executor.submit(plan).result()
                return []
            self._inflight = (plan, self.executor.submit(plan))
        plan, future = self._inflight
        self._inflight = None
        nxt = self.scheduler.schedule() if self._overlappable(plan) else None
        try:
            result = future.result()
        except BaseException:
            if nxt is not None:  # never launched: its finished ids still have to reach the runner
                self.scheduler.requeue_finished(nxt.finished)
            raise
        if nxt is not None and not nxt.is_empty:
            self._inflight = (nxt, self.executor.submit(nxt))
        elif nxt is not None and nxt.finished:  # nothing left to overlap with: deliver the finished ids now
            self.executor.submit(nxt).result()
        return self._apply(plan, result, t0)

    def _overlappable(self, plan) -> bool:
        """Whether the plan after ``plan`` may be scheduled before ``plan``'s results are in."""
        for item in plan.seqs:
            if item.child_seq_ids:
                return False
            seq = self.scheduler.live(item.seq_id)
            if seq is not None and getattr(seq.params, "structured_outputs", None) is not None:
                return False
        return True

    def _apply(self, plan, result, t0: float) -> list[SeqUpdate]:
        """Fold one finished step's results into the scheduler; the frontend's updates."""
        touched = self.scheduler.update(plan, result)
        if result.guided_done or result.jump:
            self._apply_guided(touched, result)
        updates = []
        for seq, first_new, forked in touched:
            new = seq.token_ids[first_new:]
            plp = result.prompt_logprobs.get(seq.seq_id)
            if not new and not seq.is_finished and plp is None:
                continue
            self._stats.generation_tokens += len(new)
            updates.append(SeqUpdate(seq.request_id, seq.index, new, seq.logprobs[len(seq.logprobs) - len(new):]
                                     if seq.logprobs else [], plp,
                                     seq.finish_reason.value if seq.finish_reason else None, seq.stop_reason,
                                     seq.num_cached_tokens, result.pooled.get(seq.seq_id)))
            if forked:  # a child forked this step: the request now owns it too
                self._seqs[seq.request_id].append(seq)
        for request_id in {u.request_id for u in updates}:
            self._forget_if_done(request_id)
        self._stats.steps += 1
        self._stats.forward_seconds += result.forward_seconds
        self._stats.step_seconds += time.perf_counter() - t0
        return updates

    def drain(self) -> None:
        """Wait for the step in flight (overlap) and drop its results: after a failure, or before shutdown.
        (Its plan was submitted, so the runner has its finished ids; nothing to send again.)"""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            try:
                inflight[1].result()
            except BaseException:  # the step's own failure was or will be reported by step()
                pass

    def _apply_guided(self, touched, result) -> None:
        """Grammar terminations end their sequences; jump-forward tokens replace the sampled one
        (the next step computes them as one chunk), cut at the request's length limits."""
        done = set(result.guided_done)
        for seq, _, _ in touched:
            if seq.is_finished:
                continue
            if seq.seq_id in done:
                self.scheduler.finish(seq, FinishReason.STOP)
                continue
            jump = result.jump.get(seq.seq_id)
            if jump:
                seq.token_ids[-1:] = jump
                room = min(seq.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
                if room <= 0:
                    del seq.token_ids[len(seq.token_ids) + room:]
                    self.scheduler.finish(seq, FinishReason.LENGTH)

    def forget_history(self) -> None:
        """Abort what is unfinished, drop the prefix cache and zero every counter (after a warm-up)."""
        self.abort_all()
        self.kv.reset_prefix_cache()
        self.kv.stats.reset()
        self.scheduler.num_preemptions = self.scheduler.num_prompt_tokens_computed = 0
        self._stats = EngineStats(num_blocks=self.kv.num_blocks)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank); safe to call twice."""
        self.drain()
        self.executor.close_step_thread()
        self.executor.shutdown()

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting) + len(self._compiling)
        s.kv_usage = self.kv.usage
        s.num_free_blocks = self.kv.num_free_blocks
        s.prefix_queries_tokens = self.kv.stats.queries_tokens
        s.prefix_hit_tokens = self.kv.stats.hit_tokens
        s.num_preemptions = self.scheduler.num_preemptions
        s.prompt_tokens_computed = self.scheduler.num_prompt_tokens_computed
        swap = self.scheduler.swap
        if swap is not None:
            s.swapped_out_blocks, s.swapped_in_blocks = swap.blocks_out, swap.blocks_in
            s.swap_space_full, s.num_swapped = swap.num_full, len(swap)
        s.graph_replays = self.runner.graph_replays
        return s


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later."""
