"""The sampler: one call per step turns a batch of logits rows into token ids (and logprobs).

Order of processing, per row:
logit_bias -> min_tokens (block EOS/stop tokens) -> repetition penalty -> presence/frequency
penalties -> greedy rows: argmax; random rows: temperature -> top_k -> top_p -> min_p -> draw.
Logprobs are of the raw model distribution (log_softmax of the logits as given).

Random draws use the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per
token is an exact draw from ``probs``. A seeded row takes its noise from its own generator (one
``[V]`` draw per step), so its tokens never depend on the other rows of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from tokenmill.engine.batch import TokenLogprobs  # noqa: F401 - the record type the runner returns
from tokenmill.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    """What the runner knows about one row of the batch (a plain tuple in this order works too)."""

    params: SamplingParams
    output_token_ids: Sequence[int]
    prompt_token_ids: Sequence[int]
    generator: torch.Generator | None
    num_generated: int
    eos_token_id: int | list[int] | None


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator a seeded request owns for its whole life, on the device of the logits."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplingBatch:
    """Per-step sampling inputs for ``N`` rows, as tensors on the logits' device.

    Optional tensors are None when no row needs that step, so the common batch (plain
    temperature sampling or greedy) does no extra work. Build it with :meth:`build`.
    """

    num_rows: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None          # bool [N]; None when all rows agree
    temperature: torch.Tensor | None          # float32 [N] (1.0 on greedy rows); None if all greedy
    top_k: torch.Tensor | None                # int64 [N], V where off; None if no row uses it
    max_top_k: int                            # largest k in use (host int: no device sync)
    top_p: torch.Tensor | None                # float32 [N]
    min_p: torch.Tensor | None                # float32 [N]
    # logit_bias and min_tokens: flat (row, token, value) triples for index_put_.
    bias_index: tuple[torch.Tensor, torch.Tensor] | None
    bias_values: torch.Tensor | None
    block_index: tuple[torch.Tensor, torch.Tensor] | None
    # Penalties only touch the rows listed in penalty_rows.
    penalty_rows: torch.Tensor | None         # int64 [M]
    output_ids: torch.Tensor | None           # int64 [M, Lo], padded with V
    prompt_ids: torch.Tensor | None           # int64 [M, Lp], padded with V
    repetition_penalty: torch.Tensor | None   # float32 [M]
    presence_penalty: torch.Tensor | None     # float32 [M]
    frequency_penalty: torch.Tensor | None    # float32 [M]
    generators: list[torch.Generator | None]  # per row: its own generator if seeded and random
    shared_rows: torch.Tensor | None          # int64: random rows without a seed
    all_shared: bool                          # every row is random and unseeded
    num_logprobs: list[int | None]            # per row; None: no logprobs wanted
    max_num_logprobs: int | None              # None: no row wants logprobs

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow | tuple],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Build the batch from per-row ``(params, output_token_ids, prompt_token_ids,
        generator, num_generated, eos_token_id)``. ``generator`` is used only by seeded rows
        (give each seeded request one from :func:`make_generator`, kept across steps).
        Token ids at or above ``vocab_size`` in logit_bias/stop_token_ids are ignored."""
        rows = [SamplingRow(*r) for r in rows]
        n, V = len(rows), vocab_size
        params = [r.params for r in rows]
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        def f32(values):
            return torch.tensor(values, dtype=torch.float32, device=device)

        def i64(values):
            return torch.tensor(values, dtype=torch.int64, device=device)

        temperature = top_k = top_p = min_p = None
        max_top_k = 0
        if not all_greedy:
            temperature = f32([1.0 if g else p.temperature for p, g in zip(params, greedy)])
            if any(not g and 0 < p.top_k < V for p, g in zip(params, greedy)):
                ks = [p.top_k if (not g and 0 < p.top_k < V) else V for p, g in zip(params, greedy)]
                top_k, max_top_k = i64(ks), max(k for k in ks if k < V)
            if any(not g and p.top_p < 1.0 for p, g in zip(params, greedy)):
                top_p = f32([1.0 if g else p.top_p for p, g in zip(params, greedy)])
            if any(not g and p.min_p > 0.0 for p, g in zip(params, greedy)):
                min_p = f32([0.0 if g else p.min_p for p, g in zip(params, greedy)])

        b_rows, b_toks, b_vals = [], [], []
        k_rows, k_toks = [], []
        for i, r in enumerate(rows):
            for tok, val in (r.params.logit_bias or {}).items():
                if 0 <= tok < V:
                    b_rows.append(i)
                    b_toks.append(tok)
                    b_vals.append(val)
            if r.num_generated < r.params.min_tokens:
                blocked = [t for t in r.params.all_stop_token_ids(r.eos_token_id) if 0 <= t < V]
                k_rows += [i] * len(blocked)
                k_toks += blocked

        pen = [
            i for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        ]
        penalty_rows = output_ids = prompt_ids = rep = pres = freq = None
        if pen:
            penalty_rows = i64(pen)
            output_ids = _pad([rows[i].output_token_ids for i in pen], V, device)
            rep = f32([params[i].repetition_penalty for i in pen])
            pres = f32([params[i].presence_penalty for i in pen])
            freq = f32([params[i].frequency_penalty for i in pen])
            if any(params[i].repetition_penalty != 1.0 for i in pen):
                prompt_ids = _pad([rows[i].prompt_token_ids for i in pen], V, device)

        generators: list[torch.Generator | None] = []
        shared: list[int] = []
        for i, (r, g) in enumerate(zip(rows, greedy)):
            if not g and r.params.seed is not None:
                if r.generator is None:
                    raise ValueError(f"row {i} has seed={r.params.seed} but no generator; "
                                     "give the request one from make_generator() and keep it")
                generators.append(r.generator)
            else:
                generators.append(None)
                if not g:
                    shared.append(i)

        num_logprobs = [p.logprobs for p in params]
        wanted = [k for k in num_logprobs if k is not None]
        return cls(
            num_rows=n,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if (all_greedy or all_random) else torch.tensor(greedy, device=device),
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            bias_index=(i64(b_rows), i64(b_toks)) if b_rows else None,
            bias_values=f32(b_vals) if b_rows else None,
            block_index=(i64(k_rows), i64(k_toks)) if k_rows else None,
            penalty_rows=penalty_rows,
            output_ids=output_ids,
            prompt_ids=prompt_ids,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            generators=generators,
            shared_rows=i64(shared) if shared and len(shared) < n else None,
            all_shared=len(shared) == n,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(wanted) if wanted else None,
        )


def _pad(seqs: list[Sequence[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    # Ids outside the logits (a tokenizer larger than the model's vocab) land in the pad column.
    out.masked_fill_((out < 0) | (out > pad), pad)
    return out.to(device)


@dataclass
class LogprobsTensors:
    """Logprobs of ``N`` target tokens: the token's own logprob and rank (1 = most likely)
    and the ``K`` most likely tokens (descending), all under the raw distribution."""

    token_ids: torch.Tensor      # int64 [N]
    logprobs: torch.Tensor       # float32 [N]
    ranks: torch.Tensor          # int64 [N]
    top_ids: torch.Tensor        # int64 [N, K]
    top_logprobs: torch.Tensor   # float32 [N, K]


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor, num_top: int) -> LogprobsTensors:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, targets.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_lp, top_ids = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
    return LogprobsTensors(targets, chosen.squeeze(1), ranks, top_ids, top_lp)


def _to_python(lp: LogprobsTensors, wanted: Sequence[int | None]) -> list[TokenLogprobs | None]:
    ids, vals, ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
    top_ids, top_vals = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    out: list[TokenLogprobs | None] = []
    for i, k in enumerate(wanted):
        if k is None:
            out.append(None)
        else:
            out.append(TokenLogprobs(ids[i], vals[i], ranks[i], list(zip(top_ids[i][:k], top_vals[i][:k]))))
    return out


@dataclass
class SamplerOutput:
    """One step's result: ``sampled_token_ids`` int64 ``[N]`` (on the logits' device, so the
    runner can overlap the copy) and, when any row asked, the logprobs of every row."""

    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None
    num_logprobs: list[int | None]

    def token_ids(self) -> list[int]:
        return self.sampled_token_ids.tolist()

    def row_logprobs(self) -> list[TokenLogprobs | None]:
        """Per row: its logprobs with ``top`` cut to what it asked for, or None if it did not ask."""
        if self.logprobs is None:
            return [None] * len(self.num_logprobs)
        return _to_python(self.logprobs, self.num_logprobs)


class Sampler:
    """Samples one token per logits row. ``generator`` is the shared generator of unseeded
    rows (None: torch's default generator of the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, meta: SamplingBatch) -> SamplerOutput:
        """``logits``: float ``[N, V]``; it is not modified."""
        raw = logits
        if meta.all_greedy and meta.bias_index is None and meta.block_index is None and meta.penalty_rows is None:
            # Nothing edits the logits: argmax of the raw rows (a float cast keeps the order and ties).
            sampled = logits.argmax(dim=-1)
            lp = None if meta.max_num_logprobs is None else _logprobs_of(raw, sampled, meta.max_num_logprobs)
            return SamplerOutput(sampled, lp, meta.num_logprobs)
        logits = logits.float().clone()
        if meta.bias_index is not None:
            logits.index_put_(meta.bias_index, meta.bias_values, accumulate=True)
        if meta.block_index is not None:
            logits.index_put_(meta.block_index, torch.tensor(float("-inf"), device=logits.device))
        if meta.penalty_rows is not None:
            logits[meta.penalty_rows] = apply_penalties(logits[meta.penalty_rows], meta)

        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            greedy = logits.argmax(dim=-1) if meta.greedy_mask is not None else None
            sampled = self._sample(logits, meta)  # works in place on logits
            if greedy is not None:
                sampled = torch.where(meta.greedy_mask, greedy, sampled)

        lp = None
        if meta.max_num_logprobs is not None:
            lp = _logprobs_of(raw, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, lp, meta.num_logprobs)

    def _sample(self, logits: torch.Tensor, meta: SamplingBatch) -> torch.Tensor:
        logits.div_(meta.temperature.unsqueeze(1))
        if meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        elif meta.top_k is not None:
            logits = apply_top_k_only(logits, meta.top_k, meta.max_top_k)
        probs = torch.softmax(logits, dim=-1)
        if meta.min_p is not None:
            probs = apply_min_p(probs, meta.min_p)
        return self._exponential_race(probs, meta)

    def _exponential_race(self, probs: torch.Tensor, meta: SamplingBatch) -> torch.Tensor:
        q = torch.empty_like(probs)
        if meta.all_shared:
            q.exponential_(generator=self.generator)
        else:
            q.fill_(1.0)  # greedy rows: their draw is replaced by the argmax anyway
            if meta.shared_rows is not None:
                q[meta.shared_rows] = torch.empty(
                    (meta.shared_rows.numel(), probs.shape[1]), device=probs.device
                ).exponential_(generator=self.generator)
            for i, g in enumerate(meta.generators):
                if g is not None:
                    q[i].exponential_(generator=g)
        # Exp(1) can round to 0; a zero would turn a masked 0-probability token into 0/0.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, meta: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (HF/vLLM: over prompt + output tokens, positive logits divided by
    the penalty and negative ones multiplied), then OpenAI presence/frequency penalties over
    output tokens: ``logit -= frequency * count + presence * (count > 0)``.
    ``logits`` are the ``[M, V]`` rows of ``meta.penalty_rows``."""
    M, V = logits.shape
    counts = torch.zeros((M, V + 1), dtype=torch.int64, device=logits.device)
    counts.scatter_add_(1, meta.output_ids, torch.ones_like(meta.output_ids))
    counts = counts[:, :V]
    in_output = counts > 0
    if meta.prompt_ids is not None:
        seen = torch.zeros((M, V + 1), dtype=torch.bool, device=logits.device)
        seen.scatter_(1, meta.prompt_ids, True)
        seen = seen[:, :V] | in_output
        r = meta.repetition_penalty.unsqueeze(1).expand_as(logits)
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty.unsqueeze(1) * counts.to(logits.dtype)
    logits = logits - meta.presence_penalty.unsqueeze(1) * in_output.to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Mask to -inf all but each row's ``k`` largest logits (exactly k, ties broken by sort
    order), then all but the smallest set of the remaining tokens whose probability sums to at
    least ``p`` (the most likely token always stays). ``k == V`` / ``p == 1`` leave a row alone."""
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if k is not None:
        drop = torch.arange(V, device=logits.device).unsqueeze(0) < (V - k).unsqueeze(1)
        sorted_logits.masked_fill_(drop, float("-inf"))
    if p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_top_k_only(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Top-k without a full sort (``max_k`` = the largest k below V): keep logits >= each row's
    k-th largest (ties at the boundary are kept); rows with ``k == V`` are left alone."""
    V = logits.shape[1]
    top = logits.topk(max_k, dim=-1).values
    kth = top.gather(1, (k.clamp(max=max_k) - 1).unsqueeze(1))
    kth = kth.masked_fill_((k >= V).unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero every probability below ``min_p`` times its row's largest (no renormalisation is
    needed: the exponential race draws from unnormalised weights)."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill_(probs < threshold, 0.0)


def compute_token_logprobs(logits: torch.Tensor, target_token_ids: Sequence[int] | torch.Tensor,
                           num_top: int) -> LogprobsTensors:
    """Logprobs of ``target_token_ids[i]`` under ``logits[i]`` (raw log_softmax), with ranks and
    the ``num_top`` best. The building block of prompt logprobs for chunked prefill: pass a
    chunk's logits and the prompt tokens that follow each position."""
    targets = torch.as_tensor(target_token_ids, dtype=torch.int64, device=logits.device)
    return _logprobs_of(logits, targets, num_top)


def compute_prompt_logprobs(logits: torch.Tensor, prompt_token_ids: Sequence[int],
                            num_top: int) -> list[TokenLogprobs | None]:
    """Prompt logprobs as vLLM returns them: ``logits[i]`` is the model output at prompt
    position ``i`` (``[P, V]``, ``P = len(prompt_token_ids)``; the last row, which predicts the
    first generated token, is not used). Entry 0 is None (nothing precedes the first token);
    entry ``i`` is the logprob of ``prompt_token_ids[i]`` given the tokens before it."""
    P = len(prompt_token_ids)
    if logits.shape[0] != P:
        raise ValueError(f"expected {P} rows of logits for {P} prompt tokens, got {logits.shape[0]}")
    if P < 2:
        return [None] * P
    return [None] + token_logprobs(logits[: P - 1], list(prompt_token_ids[1:]), num_top)


def token_logprobs(logits: torch.Tensor, target_token_ids: Sequence[int], num_top: int) -> list[TokenLogprobs]:
    """:func:`compute_token_logprobs` as Python records, each with its ``num_top`` best: what a
    prefill chunk contributes to its prompt's logprobs."""
    lp = compute_token_logprobs(logits, target_token_ids, num_top)
    return _to_python(lp, [num_top] * len(target_token_ids))
