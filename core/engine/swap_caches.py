"""The runner's half of ``--preemption-mode swap``: host copies of swapped-out KV blocks.

The scheduler and :class:`tokenmill.kv.swap_space.SwapSpace` decide, on ids, which blocks
go out to which host slot and come back into which fresh block; the step message carries
those pairs (``swap_out``, ``swap_in``). This holds the host tensors, one per layer in the
attention backend's layout, page-locked through :meth:`Platform.pin_memory` (which leaves
them pageable where ``pinned_memory`` is not declared), and copies through
``AttentionBackend.swap_blocks``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from tokenmill.config import CacheConfig

log = logging.getLogger(__name__)


class SwapCaches:
    """The host swap space of one model runner (empty until :meth:`allocate`)."""

    def __init__(self, platform, backend, cache: CacheConfig, dtype: torch.dtype, num_layers: int,
                 shape_of: Callable[[int], tuple[int, ...]], block_bytes: int):
        self.platform = platform
        self.backend = backend
        self.cache = cache
        self.dtype = dtype
        self.num_layers = num_layers
        #: The backend's KV layout for a number of blocks (as the runner's device cache).
        self.shape_of = shape_of
        #: Bytes of one block over all layers.
        self.block_bytes = block_bytes
        #: One host tensor per layer.
        self.caches: list[torch.Tensor] = []

    def num_slots(self, max_needed: int) -> int:
        """Host swap slots that fit ``swap_space`` GiB (``num_swap_blocks`` overrides), at most ``max_needed``."""
        if self.cache.num_swap_blocks is not None:
            return self.cache.num_swap_blocks
        return int(min(int(self.cache.swap_space * (1 << 30)) // self.block_bytes, max_needed))

    def allocate(self, num_slots: int) -> None:
        """Host memory for ``num_slots`` swapped-out blocks per layer."""
        shape = self.shape_of(num_slots)
        self.caches = [self.platform.pin_memory(torch.empty(shape, dtype=self.dtype)) for _ in range(self.num_layers)]
        log.info("model runner: swap space of %d blocks (%.2f GiB, %s)", num_slots,
                 num_slots * self.block_bytes / 2**30,
                 "page-locked" if self.platform.capabilities.pinned_memory else "pageable")

    def swap_out(self, kv_caches: list, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host slots, ``pairs`` of ``(block, slot)``."""
        self.backend.swap_blocks(kv_caches, self.caches, pairs)

    def swap_in(self, kv_caches: list, pairs: list[tuple[int, int]]) -> None:
        """Copy host slots back into device blocks, ``pairs`` of ``(slot, block)``."""
        self.backend.swap_blocks(self.caches, kv_caches, pairs)
