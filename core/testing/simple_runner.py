"""A minimal greedy decode loop over the model and attention interfaces, for tests and conformance.

It is deliberately naive (no scheduler, no prefix sharing, blocks handed out in order) so
that it checks a model + kernels + attention backend without the engine: every step
builds the ragged :class:`AttentionMetadata` the way the model runner must, prefill
(optionally in chunks) and decode tokens of several sequences mixed in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.attention.interface import AttentionMetadata


@dataclass
class _Seq:
    tokens: list[int]
    prompt_len: int
    max_new: int
    computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) - self.prompt_len >= self.max_new


class SimpleRunner:
    """Greedy generation for a batch of prompts with a paged KV cache.

    ``model``: a :class:`tokenmill.models.interface.CausalLM`; ``backend``: its attention
    backend class (for the cache shape and ``prepare``). ``num_blocks`` defaults to enough
    for ``max_tokens_per_seq`` tokens for ``max_seqs`` sequences.
    """

    def __init__(self, model, backend, device, dtype, block_size: int = 16, num_blocks: int | None = None,
                 max_seqs: int = 8, max_tokens_per_seq: int = 256):
        self.model, self.backend, self.device, self.block_size = model, backend, device, block_size
        num_layers, spec = model.attention_spec()
        self.num_blocks = num_blocks or max_seqs * -(-max_tokens_per_seq // block_size)
        shape = backend.kv_cache_shape(self.num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.next_block = 0

    def _alloc(self, seq: _Seq, upto: int) -> None:
        while len(seq.blocks) * self.block_size < upto:
            if self.next_block >= self.num_blocks:
                raise RuntimeError("SimpleRunner ran out of KV blocks")
            seq.blocks.append(self.next_block)
            self.next_block += 1

    def build_step(self, chunks: list[tuple[_Seq, int]]):
        """Tensors for one step: ``chunks`` lists ``(seq, n)``: feed the next ``n`` uncached tokens of ``seq``."""
        ids, pos, slots, qlens, slens = [], [], [], [], []
        for seq, n in chunks:
            start = seq.computed
            self._alloc(seq, start + n)
            for p in range(start, start + n):
                ids.append(seq.tokens[p])
                pos.append(p)
                slots.append(seq.blocks[p // self.block_size] * self.block_size + p % self.block_size)
            qlens.append(n)
            slens.append(start + n)
        dev = self.device
        meta = AttentionMetadata.from_lists(qlens, slens, [seq.blocks for seq, _ in chunks], slots,
                                            self.block_size, dev)
        return (torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64, device=dev),
                meta)

    @torch.no_grad()  # not inference_mode: XLA tensors do not support it
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits ``[len(token_ids), vocab]`` of one prompt prefilled in a single step."""
        seq = _Seq(list(token_ids), len(token_ids), 0)
        input_ids, positions, meta = self.build_step([(seq, len(token_ids))])
        self.backend.prepare(meta)
        return self.model.compute_logits(self.model.forward(input_ids, positions, self.kv_caches, meta))

    @torch.no_grad()  # not inference_mode: XLA tensors do not support it
    def generate(self, prompts: list[list[int]], max_new_tokens: int, chunk_size: int | None = None):
        """Greedy-decode every prompt for ``max_new_tokens`` (no stop tokens).

        With ``chunk_size``, prompts are prefilled ``chunk_size`` tokens per step, mixed
        with the decode tokens of sequences already past their prompt. Returns
        ``[(new_token_ids, logprobs)]`` per prompt, logprobs of the chosen tokens.
        """
        seqs = [_Seq(list(p), len(p), max_new_tokens) for p in prompts]
        while not all(s.done for s in seqs):
            chunks = []
            for s in seqs:
                if s.done:
                    continue
                remaining = len(s.tokens) - s.computed
                chunks.append((s, min(remaining, chunk_size) if chunk_size else remaining))
            input_ids, positions, meta = self.build_step(chunks)
            self.backend.prepare(meta)
            hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
            # Sample only for sequences whose every known token is now cached.
            last_rows, sampling = [], []
            row = 0
            for s, n in chunks:
                row += n
                s.computed += n
                if s.computed == len(s.tokens):
                    last_rows.append(row - 1)
                    sampling.append(s)
            if not sampling:
                continue
            logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=hidden.device)])
            logprobs = torch.log_softmax(logits, dim=-1)
            next_ids = logits.argmax(dim=-1).tolist()
            for s, tok, lp in zip(sampling, next_ids, logprobs):
                s.tokens.append(tok)
                s.logprobs.append(float(lp[tok]))
        return [(s.tokens[s.prompt_len:], s.logprobs) for s in seqs]


def reference_context(dtype=torch.float32, device="cpu"):
    """A :class:`ModelContext` with only the core's reference ops and reference attention."""
    from tokenmill.attention.reference import ReferenceAttention
    from tokenmill.models.interface import ModelContext
    from tokenmill.ops.reference import REFERENCE_OPS
    from tokenmill.ops.registry import KernelImpl, Kernels

    kernels = Kernels(torch.device(device).type, [KernelImpl(op, "*", fn, provider="reference")
                                                  for op, fn in REFERENCE_OPS.items()])
    return ModelContext(kernels=kernels, attention_backend=ReferenceAttention, dtype=dtype,
                        device=torch.device(device))
