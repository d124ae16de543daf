"""Structured output inside a step: one matcher per sequence, the bitmask, jump-forward.

The model runner holds a :class:`GuidedRuntime` (built by the engine with the compiler once
the first constrained request arrives) and calls it on the hot path:

- :meth:`GuidedRuntime.matcher` when a constrained sequence arrives in a ``NewSeq``: a fresh
  matcher from the (already compiled, cached) grammar, with the sequence's output so far
  replayed (a sequence resent after preemption continues where it was);
- :meth:`GuidedRuntime.mask` before sampling: fills the bitmask rows of the constrained rows
  (one batched call per matcher class) and applies them through the registered
  ``apply_token_bitmask`` op, once over the batch, skipping the unconstrained rows;
- :meth:`GuidedRuntime.advance` after sampling: accepts the token, reports termination, and
  with jump-forward returns the token plus the grammar's forced continuation, retokenized
  together so the sequence keeps the tokenizer's canonical tokenization (as SGLang does).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tokenmill.guided.interface import MAX_ROLLBACK, GuidedMatcher
from tokenmill.guided.manager import GuidedCompiler

log = logging.getLogger(__name__)

#: Most tokens one jump appends (the rest is forced again after the next step): a failed
#: retokenization must stay within what a matcher can roll back.
MAX_JUMP_TOKENS = MAX_ROLLBACK - 1


class GuidedSeq:
    """One sequence's structured-output state: its matcher and, when forced text is emitted one
    token per step (jump-forward off), the canonical forced tokens still to come."""

    __slots__ = ("matcher", "chunk", "forced")

    def __init__(self, matcher: GuidedMatcher, chunk: bool, forced: list[int] | None = None):
        self.matcher = matcher
        self.chunk = chunk
        self.forced = forced or []

    def fork(self) -> "GuidedSeq":
        return GuidedSeq(self.matcher.fork(), self.chunk, list(self.forced))


class GuidedRuntime:
    """The runner's structured-output helper; ``jump_forward`` is the engine-wide default.

    Forced text is always emitted as the tokenizer's canonical tokens, so jump-forward changes
    how many forward passes a request takes, never its tokens: on, they are appended at once and
    computed as one chunk; off (or when the request asks for logprobs, which a token computed
    inside a chunk has none of), the mask allows only the next forced token at each step.
    """

    def __init__(self, compiler: GuidedCompiler, jump_forward: bool = True, allow_jump: bool = True):
        self.compiler = compiler
        self.vocab = compiler.vocab
        self.jump_forward = jump_forward
        #: False where no request may jump (tensor parallelism: only rank 0 would see the forced tokens).
        self.allow_jump = allow_jump
        self._token_bytes = None
        #: Forced tokens appended (beyond the sampled ones), for benchmarks.
        self.num_forced_tokens = 0
        #: Seconds spent in :meth:`mask` and :meth:`advance` (the guided work of the steps), for benchmarks.
        self.mask_seconds = 0.0
        self.advance_seconds = 0.0
        # jump-forward reads every token's bytes: built on the compile thread, done before any grammar
        compiler.warm(self.vocab.token_bytes)

    def seq(self, params, output_token_ids, old: GuidedSeq | None = None) -> GuidedSeq:
        """The state of a sequence arriving in a ``NewSeq``: ``old`` if given (it followed the same
        tokens), else a fresh matcher that has accepted ``output_token_ids`` (after a preemption)."""
        if old is not None:
            return old
        so = params.structured_outputs
        handle = self.compiler.submit(so.spec, so.backend, not so.disable_fallback)
        m = handle.grammar.matcher()  # the engine admits a sequence only once its grammar is ready
        for i, t in enumerate(output_token_ids):
            if not m.accept_token(t):
                log.warning("guided: replaying output token %d (position %d) was refused by the grammar", t, i)
                break
        jf = self.jump_forward if so.jump_forward is None else so.jump_forward
        return GuidedSeq(m, jf and self.allow_jump and params.logprobs is None)

    def mask(self, logits: torch.Tensor, rows: list[int], seqs: list[GuidedSeq], apply_op) -> torch.Tensor:
        """``logits`` with rows ``rows`` masked by their sequences' allowed tokens, in one fill per
        matcher class and one op over the batch (other rows untouched; the rows of a forking
        sequence share one fill; a sequence emitting forced text allows only its next token)."""
        t0 = time.perf_counter()
        bm = np.zeros((logits.shape[0], self.vocab.bitmask_width), dtype=np.int32)
        first: dict[int, int] = {}
        copies: list[tuple[int, int]] = []
        fills: dict[type, tuple[list, list]] = {}
        for row, gs in zip(rows, seqs):
            j = first.setdefault(id(gs), row)
            if j != row:
                copies.append((row, j))
            elif gs.forced:
                t = gs.forced[0]
                bm[row, t >> 5] = np.int32(np.uint32(1 << (t & 31)).view(np.int32))
            else:
                ms, rs = fills.setdefault(type(gs.matcher), ([], []))
                ms.append(gs.matcher)
                rs.append(row)
        for cls, (ms, rs) in fills.items():
            cls.fill_bitmasks(ms, bm, rs)
        for row, j in copies:
            bm[row] = bm[j]
        out = apply_op(logits, torch.from_numpy(bm), None if len(rows) == logits.shape[0] else rows)
        self.mask_seconds += time.perf_counter() - t0
        return out

    def advance(self, gs: GuidedSeq, token: int) -> tuple[bool, list[int] | None]:
        """Accept the sampled ``token``; returns ``(terminated, replacement)``: ``replacement``
        (or None) takes the token's place - the token and the forced continuation, canonically
        tokenized together (all of it with jump-forward, else its first token)."""
        t0 = time.perf_counter()
        try:
            return self._advance(gs, token)
        finally:
            self.advance_seconds += time.perf_counter() - t0

    def _advance(self, gs: GuidedSeq, token: int) -> tuple[bool, list[int] | None]:
        m = gs.matcher
        if gs.forced:
            expected = gs.forced.pop(0)
            if token == expected and m.accept_token(token):
                return False, None
            gs.forced = []
            log.warning("guided: forced token %d came out as %d", expected, token)
            return True, None
        if not m.accept_token(token):
            # only if the mask was defeated (every token blocked, e.g. by min_tokens): end the sequence
            log.warning("guided: sampled token %d is not allowed by the grammar; ending the sequence", token)
            return True, None
        if m.is_terminated():
            return True, None
        forced = m.forced_continuation()
        if not forced:
            return False, None
        ids = self._jump(m, token, forced)
        if ids is None:
            return False, None
        self.num_forced_tokens += len(ids) - 1
        if gs.chunk:
            return False, ids
        # one token per step: the matcher is ahead by the queued tokens; they are accepted
        # again as they come out, so rewind to just after the first
        m.rollback(len(ids) - 1)
        gs.forced = ids[1:]
        return False, ids[:1]

    def _jump(self, matcher: GuidedMatcher, token: int, forced: str) -> list[int] | None:
        """Canonical tokens for ``token`` + ``forced``, accepted by ``matcher`` (which then stands
        after them), or None (matcher unchanged)."""
        if self._token_bytes is None:
            self._token_bytes = self.vocab.token_bytes()
            tok = self.vocab.tokenizer
            fast = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer skips the wrapper's overhead
            self._encode = (lambda text: fast.encode(text, add_special_tokens=False).ids) if fast is not None \
                else (lambda text: tok.encode(text, add_special_tokens=False))
        encode = self._encode
        candidates = []
        raw = self._token_bytes[token] if token < len(self._token_bytes) else None
        if raw:
            try:
                # the sampled token is not computed yet, so it may merge with the forced text
                candidates.append((True, encode(raw.decode("utf-8") + forced)))
            except UnicodeDecodeError:  # a partial character: tokenize the forced text on its own
                pass
        candidates.append((False, [token] + encode(forced)))
        for replaces, ids in candidates:
            ids = ids[:MAX_JUMP_TOKENS + 1]
            if len(ids) < 2 and not (replaces and ids and ids[0] != token):
                continue  # nothing gained
            if replaces:
                matcher.rollback(1)
                todo = ids
            else:
                todo = ids[1:]
            done = 0
            for t in todo:
                if not matcher.accept_token(t):
                    break
                done += 1
            if done == len(todo) and not matcher.is_terminated():
                return ids
            matcher.rollback(done)
            if replaces:
                matcher.accept_token(token)
        return None
