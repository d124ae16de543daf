"""Shape buckets: pad each step to one of a few shapes, so a static-shape device compiles few graphs.

A device that compiles one graph per input shape (XLA) would compile anew for almost
every step of continuous batching: the number of tokens, of sequences and the width of
the block table all change. When the platform declares ``static_shapes``, the model
runner pads every step up to the smallest bucket that fits in each of the three
dimensions, so the number of graphs is bounded by the number of bucket combinations;
the same buckets size the decode graphs of a platform that captures graphs.

Padding keeps the attention contract (:mod:`tokenmill.attention.interface`): padded
sequences have no new tokens and an empty context (query length 0, sequence length 0,
a block-table row of zeros); padded tokens sit after every real sequence's rows (past
``query_start_loc[S]``), with input id 0, position 0 and slot -1 (not written), and their
outputs are ignored. Block-table rows are padded with block 0 (padding is arbitrary).

The buckets are configured by :class:`tokenmill.config.BucketConfig` (default: powers of
two up to the scheduler's limits) and logged once when the runner starts, and each time
a step first uses a combination.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.engine.input_batch import StepInputs

log = logging.getLogger(__name__)


def powers_of_two(start: int, limit: int) -> tuple[int, ...]:
    """``start, 2*start, ...`` below ``limit``, then ``limit`` itself: ``(16, 32, 64, 100)`` for (16, 100)."""
    out, b = [], max(1, start)
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return tuple(out)


@dataclass
class ShapeBuckets:
    """The bucket sizes of the three padded dimensions, and the combinations steps have used."""

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    widths: tuple[int, ...]
    seen: set = field(default_factory=set)

    @classmethod
    def from_config(cls, config, max_num_batched_tokens: int, max_num_seqs: int,
                    max_blocks_per_seq: int) -> "ShapeBuckets":
        """Buckets from a :class:`~tokenmill.config.BucketConfig`; unset dimensions get powers of two.

        Every dimension's largest bucket is at least its limit, so any step fits.
        """
        tokens = config.token_buckets or powers_of_two(16, max_num_batched_tokens)
        seqs = config.seq_buckets or powers_of_two(1, max_num_seqs)
        widths = config.width_buckets or powers_of_two(1, max_blocks_per_seq)
        for name, got, limit in (("token", tokens, max_num_batched_tokens), ("seq", seqs, max_num_seqs),
                                 ("width", widths, max_blocks_per_seq)):
            if max(got) < limit:
                raise ValueError(f"the largest {name} bucket {max(got)} is below the limit {limit}: "
                                 f"some steps would not fit; add a bucket >= {limit}")
        return cls(tuple(sorted(set(tokens))), tuple(sorted(set(seqs))), tuple(sorted(set(widths))))

    @property
    def num_combinations(self) -> int:
        """How many distinct padded shapes steps can have: an upper bound on compiled graphs."""
        return len(self.tokens) * len(self.seqs) * len(self.widths)

    def describe(self) -> str:
        return (f"tokens {list(self.tokens)}, sequences {list(self.seqs)}, block-table widths "
                f"{list(self.widths)} ({self.num_combinations} combinations)")

    @staticmethod
    def _fit(buckets: tuple[int, ...], n: int) -> int:
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
        return buckets[i]

    def fit_seqs(self, n: int) -> int:
        """The sequence bucket for ``n`` rows (also sizes sampled rows and decode graphs)."""
        return self._fit(self.seqs, n)

    def pick(self, num_tokens: int, num_seqs: int, width: int) -> tuple[int, int, int]:
        """The padded ``(tokens, sequences, width)`` of a step; logs a combination's first use."""
        shape = (self._fit(self.tokens, num_tokens), self._fit(self.seqs, num_seqs), self._fit(self.widths, width))
        if shape not in self.seen:
            self.seen.add(shape)
            log.info("shape buckets: first step padded to %d tokens, %d sequences, %d blocks per sequence "
                     "(%d of %d combinations used)", *shape, len(self.seen), self.num_combinations)
        return shape


def pad_step(buckets: ShapeBuckets, step: StepInputs) -> StepInputs:
    """``step`` padded to its bucket (a new :class:`StepInputs`; ``step`` itself is unchanged)."""
    num_tokens, num_seqs, width = buckets.pick(len(step.input_ids), len(step.query_lens),
                                               max(step.block_tables.shape[1], 1))
    tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    tables[:step.block_tables.shape[0], :step.block_tables.shape[1]] = step.block_tables
    return StepInputs(_pad(step.input_ids, num_tokens, 0), _pad(step.positions, num_tokens, 0),
                      _pad(step.slots, num_tokens, -1), _pad(step.query_lens, num_seqs, 0),
                      _pad(step.seq_lens, num_seqs, 0), tables)


def _pad(values: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, dtype=values.dtype)
    out[:len(values)] = values
    return out


def pad_rows(buckets: ShapeBuckets, rows: list[int]) -> list[int]:
    """``rows`` (of hidden states to turn into logits) repeated at the end up to a sequence bucket."""
    if not rows:
        return rows
    size = buckets.fit_seqs(len(rows)) if len(rows) <= buckets.seqs[-1] else len(rows)
    return rows + [rows[0]] * (size - len(rows))
