"""The model runner: turns the scheduler's decision into tensors, runs the model, samples.

The only part of the engine that touches tensors per step. Built once from the
platform, the resolved kernels and the chosen attention backend.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from tokenmill.attention.interface import AttentionMetadata, AttentionSpec
from tokenmill.engine.batch import RunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.config import EngineConfig
from tokenmill.models.interface import ModelContext
from tokenmill.models.loader import load_model, resolve_dtype
from tokenmill.sampler import Sampler, SamplingBatch, token_logprobs

log = logging.getLogger(__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _attention_spec(model_cls, cfg, dtype_name: str) -> AttentionSpec:
    """The attention configuration a model will ask for, before building it (to pick the backend)."""
    try:
        return model_cls.attention_spec_for(cfg, dtype_name)
    except (AttributeError, NotImplementedError):
        pass
    heads = cfg.num_attention_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = None
    if hasattr(model_cls, "layer_sliding_window"):
        windows = {model_cls.layer_sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)}
        window = windows.pop() if len(windows) == 1 else None
    return AttentionSpec(heads, getattr(cfg, "num_key_value_heads", None) or heads, head_size, dtype_name, window)


class ModelRunner:
    """Loads the model and the KV cache on a platform and executes :class:`SchedulerOutput` steps."""

    def __init__(self, config: EngineConfig, platform, plugin_manager, hf_config):
        self.config = config
        self.platform = platform
        self.device = platform.device()
        self.dtype = resolve_dtype(config.model.dtype, hf_config)
        dtype_name = _dtype_name(self.dtype)
        if dtype_name not in platform.capabilities.dtypes:
            raise ValueError(f"dtype {dtype_name} is not supported by platform {platform.name} "
                             f"(supported: {', '.join(platform.capabilities.dtypes)})")
        self.kernels = plugin_manager.kernels(platform.name, dtype_name, core_only=config.reference_ops)
        archs = plugin_manager.model_architectures()
        names = getattr(hf_config, "architectures", None) or []
        model_cls = next((archs[n] for n in names if n in archs), None)
        if model_cls is None:
            raise ValueError(f"unknown architecture {names}; supported architectures: {', '.join(sorted(archs))}")
        spec = _attention_spec(model_cls, hf_config, dtype_name)
        self.backend = plugin_manager.attention_backend(platform.name, spec, core_only=config.reference_ops)
        ctx = ModelContext(kernels=self.kernels, attention_backend=self.backend, dtype=self.dtype, device=self.device)
        self.model = load_model(config.model.model, ctx, plugin_manager.model_architectures())
        self.num_layers, self.spec = self.model.attention_spec()
        self.block_size = config.cache.block_size
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler()
        self._generators: dict[int, torch.Generator] = {}
        self.kv_caches: list[torch.Tensor] = []

    # -- KV cache ------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        shape = self.backend.kv_cache_shape(1, self.block_size, self.spec.num_kv_heads, self.spec.head_size)
        return math.prod(shape) * torch.empty((), dtype=self.dtype).element_size() * self.num_layers

    def num_kv_blocks(self, max_needed: int) -> int:
        """Blocks that fit the configured KV memory, capped at what the limits could ever use."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory or self.platform.kv_cache_budget(cache.memory_fraction)
        blocks = budget // self.block_bytes()
        if blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no block of {self.block_bytes()} bytes")
        return int(min(blocks, max_needed))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self.backend.kv_cache_shape(num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_size)
        self.kv_caches = [self.platform.allocate(shape, self.dtype) for _ in range(self.num_layers)]

    # -- one step ------------------------------------------------------------------------------
    def _build(self, out: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens = []
        query_lens = []
        max_blocks = max(len(s.block_table) for s in out.seqs)
        tables = []
        for item in out.seqs:
            start, n = item.start, item.num_new
            input_ids.extend(item.seq.token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = item.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            query_lens.append(n)
            tables.append(table + [0] * (max_blocks - len(table)))
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, block_size=bs,
        )
        self.backend.prepare(meta)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos_t, meta, qsl

    def _generator(self, seq, index: int) -> torch.Generator | None:
        """The seeded generator of continuation ``index`` of ``seq``'s request (seed + index, as vLLM)."""
        seed = seq.params.seed
        if seed is None:
            return None
        key = (seq.request_id, index)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((seed + index) & 0xFFFF_FFFF_FFFF_FFFF)
            self._generators[key] = gen
        return gen

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for key in out.finished:
            self._generators.pop(key, None)
        result = RunnerOutput()
        if out.is_empty:
            return result
        self.backend.copy_blocks(self.kv_caches, out.block_copies)
        ids, positions, meta, qsl = self._build(out)
        t0 = time.perf_counter()
        hidden = self.model.forward(ids, positions, self.kv_caches, meta)

        sample_rows, sample_items, prompt_items = [], [], []
        for i, item in enumerate(out.seqs):
            if item.prompt_logprobs:
                prompt_items.append((i, item))
            if item.sample:
                sample_rows.extend([qsl[i + 1] - 1] * item.num_samples)
                sample_items.append(item)
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])
            self._sample(logits, sample_items, result)
        for i, item in prompt_items:
            self._prompt_logprobs(hidden[qsl[i]:qsl[i + 1]], item, result)
        self.platform.synchronize()
        result.forward_seconds = time.perf_counter() - t0
        return result

    def _sample(self, logits: torch.Tensor, items, result: RunnerOutput) -> None:
        rows = []
        for item in items:
            seq = item.seq
            for k in range(item.num_samples):  # k > 0: the child that forks from this sample
                rows.append((seq.params, seq.output_token_ids, seq.prompt_token_ids,
                             self._generator(seq, seq.index + k), seq.num_output_tokens, seq.eos_token_id))
        batch = SamplingBatch.build(rows, vocab_size=logits.shape[-1], device=logits.device)
        sout = self.sampler(logits, batch)
        tokens = sout.token_ids()
        lps = sout.row_logprobs()
        row = 0
        for item in items:
            seq = item.seq
            n = item.num_samples
            result.sampled[seq.seq_id] = tokens[row:row + n]
            if seq.params.logprobs is not None:
                result.logprobs[seq.seq_id] = lps[row:row + n]
            row += n

    def _prompt_logprobs(self, hidden: torch.Tensor, item, result: RunnerOutput) -> None:
        seq = item.seq
        start, n = item.start, item.num_new
        # row p predicts token p+1; only positions inside the prompt count
        last = min(start + n, seq.num_prompt_tokens - 1)
        records: list[TokenLogprobs | None] = [None] if start == 0 else []
        if last > start:
            logits = self.model.compute_logits(hidden[: last - start])
            targets = seq.token_ids[start + 1:last + 1]
            records.extend(token_logprobs(logits, targets, seq.params.prompt_logprobs))
        result.prompt_logprobs[seq.seq_id] = records
