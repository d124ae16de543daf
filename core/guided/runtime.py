"""Structured output inside a step: one matcher per sequence, the bitmask, jump-forward.

The model runner holds a :class:`GuidedRuntime` (built by the engine with the compiler once
the first constrained request arrives) and calls it on the hot path:

- :meth:`GuidedRuntime.matcher` when a constrained sequence arrives in a ``NewSeq``: a fresh
  matcher from the (already compiled, cached) grammar, with the sequence's output so far
  replayed (a sequence resent after preemption continues where it was);
- :meth:`GuidedRuntime.mask` before sampling: fills the bitmask rows of the constrained rows
  and applies them through the registered ``apply_token_bitmask`` op;
- :meth:`GuidedRuntime.advance` after sampling: accepts the token, reports termination, and
  with jump-forward returns the token plus the grammar's forced continuation, retokenized
  together so the sequence keeps the tokenizer's canonical tokenization (as SGLang does).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from tokenmill.guided.interface import MAX_ROLLBACK, GuidedMatcher
from tokenmill.guided.manager import GuidedCompiler

log = logging.getLogger(__name__)

#: Most tokens one jump appends (the rest is forced again after the next step): a failed
#: retokenization must stay within what a matcher can roll back.
MAX_JUMP_TOKENS = MAX_ROLLBACK - 1


class GuidedRuntime:
    """The runner's structured-output helper; ``jump_forward`` is the engine-wide default."""

    def __init__(self, compiler: GuidedCompiler, jump_forward: bool = True):
        self.compiler = compiler
        self.vocab = compiler.vocab
        self.jump_forward = jump_forward
        self._token_bytes = None
        #: Forced tokens appended by jump-forward (beyond the sampled ones), for benchmarks.
        self.num_jump_tokens = 0

    def matcher(self, so, output_token_ids) -> GuidedMatcher:
        """A matcher for ``so`` (StructuredOutputsParams) that has accepted ``output_token_ids``."""
        handle = self.compiler.submit(so.spec, so.backend)
        m = handle.grammar.matcher()  # the engine admits a sequence only once its grammar is ready
        for i, t in enumerate(output_token_ids):
            if not m.accept_token(t):
                log.warning("guided: replaying output token %d (position %d) was refused by the grammar", t, i)
                break
        return m

    def wants_jump(self, params) -> bool:
        so = params.structured_outputs
        jf = self.jump_forward if so.jump_forward is None else so.jump_forward
        # forced tokens have no sampled logprob to report; such requests decode token by token
        return jf and params.logprobs is None

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list[GuidedMatcher], apply_op) -> torch.Tensor:
        """``logits`` with rows ``rows`` masked by their matchers' allowed tokens (repeated
        matchers - the rows of a forking sequence - fill once)."""
        bm = np.zeros((len(rows), self.vocab.bitmask_width), dtype=np.int32)
        first: dict[int, int] = {}
        for i, m in enumerate(matchers):
            j = first.setdefault(id(m), i)
            if j == i:
                m.fill_bitmask(bm, i)
            else:
                bm[i] = bm[j]
        mask = torch.from_numpy(bm)
        if len(rows) == logits.shape[0]:
            return apply_op(logits, mask)
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        logits = logits.clone()
        logits[idx] = apply_op(logits[idx], mask)
        return logits

    def advance(self, matcher: GuidedMatcher, token: int, jump: bool) -> tuple[bool, list[int] | None]:
        """Accept ``token``; returns ``(terminated, jump_tokens)``. ``jump_tokens`` (only with
        ``jump``) replaces ``token``: it and the forced continuation, canonically tokenized."""
        if not matcher.accept_token(token):
            # only if the mask was defeated (every token blocked, e.g. by min_tokens): end the sequence
            log.warning("guided: sampled token %d is not allowed by the grammar; ending the sequence", token)
            return True, None
        if matcher.is_terminated():
            return True, None
        if not jump:
            return False, None
        forced = matcher.forced_continuation()
        if not forced:
            return False, None
        return False, self._jump(matcher, token, forced)

    def _jump(self, matcher: GuidedMatcher, token: int, forced: str) -> list[int] | None:
        tok = self.vocab.tokenizer
        if self._token_bytes is None:
            self._token_bytes = self.vocab.token_bytes()
        candidates = []
        raw = self._token_bytes[token] if token < len(self._token_bytes) else None
        if raw:
            try:
                # the sampled token is not computed yet, so it may merge with the forced text
                candidates.append((True, tok.encode(raw.decode("utf-8") + forced, add_special_tokens=False)))
            except UnicodeDecodeError:  # a partial character: tokenize the forced text on its own
                pass
        candidates.append((False, [token] + tok.encode(forced, add_special_tokens=False)))
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
                self.num_jump_tokens += len(ids) - 1
                return ids
            matcher.rollback(done)
            if replaces:
                matcher.accept_token(token)
        return None
