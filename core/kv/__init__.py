"""Paged KV-cache bookkeeping: block pool, radix prefix tree and the manager the scheduler calls.

Pure Python on block ids and token counts; no torch here (the tensors live in the model runner).
"""
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager, PrefixCacheStats
from tokenmill.kv.radix import RadixNode, RadixTree

__all__ = ["BlockPool", "KVCacheManager", "PrefixCacheStats", "RadixNode", "RadixTree"]
