"""The model runner: turns the scheduler's decision into tensors, runs the model, samples.

The only part of the engine that touches tensors per step. Built once from the
platform, the resolved kernels and the chosen attention backend.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from tokenmill.attention.interface import AttentionSpec
from tokenmill.engine.batch import RunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.engine.buckets import ShapeBuckets, pad_rows, pad_step, powers_of_two
from tokenmill.engine.graphs import DecodeGraphs, graphs_unavailable
from tokenmill.engine.input_batch import BlockTables, StepInputs
from tokenmill.engine.swap_caches import SwapCaches
from tokenmill.config import EngineConfig
from tokenmill.models.interface import ModelContext
from tokenmill.models.loader import load_model, resolve_dtype
from tokenmill.models.tensor_parallel import rank_attention_spec
from tokenmill.plugins import CORE_NAME
from tokenmill.quant.registry import checkpoint_quantization, resolve_float_method, resolve_quantization
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

    def __init__(self, config: EngineConfig, platform, plugin_manager, hf_config, tp=None, device_index: int = 0):
        from tokenmill.executor.parallel import SINGLE

        self.config = config
        self.platform = platform
        #: This rank's tensor-parallel group (rank 0 of 1 without tensor parallelism).
        self.tp = tp or SINGLE
        self.device = platform.device(device_index)
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
        spec = rank_attention_spec(_attention_spec(model_cls, hf_config, dtype_name), self.tp)
        self.backend = plugin_manager.attention_backend(platform.name, spec, core_only=config.reference_ops)
        quant_methods = plugin_manager.registered("quantization_methods")
        if config.reference_ops:
            quant_methods = [(p, c) for p, c in quant_methods if p == CORE_NAME]
        self.quantization = resolve_quantization(quant_methods, platform, self.dtype,
                                                 checkpoint_quantization(config.model.model),
                                                 config.model.quantization)
        if self.quantization is not None and self.tp.size > 1:
            raise ValueError(f"quantization ({self.quantization.describe()}) is not supported with tensor "
                             f"parallelism yet (tensor_parallel_size={self.tp.size}); use one rank")
        #: How the layers left in float multiply (the platform's float linear, or ``F.linear``).
        self.float_method = resolve_float_method(quant_methods, platform, self.dtype)
        ctx = ModelContext(kernels=self.kernels, attention_backend=self.backend, dtype=self.dtype, device=self.device,
                           quantization=self.quantization, tp=self.tp, float_method=self.float_method)
        self.model = platform.wrap_model(load_model(config.model.model, ctx, plugin_manager.model_architectures()))
        self.num_layers, spec = self.model.attention_spec()
        self.spec = rank_attention_spec(spec, self.tp)
        self.block_size = config.cache.block_size
        self.vocab_size = hf_config.vocab_size
        # Requests without a seed of their own draw from one generator seeded by the engine's seed.
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        #: Structured output (a GuidedRuntime), set by the engine when the first constrained request arrives.
        self.guided = None
        #: Shape buckets every step is padded to, on a platform that declares static shapes.
        self.buckets: ShapeBuckets | None = None
        self._max_len = config.model.max_model_len or getattr(hf_config, "max_position_embeddings", None) or 2048
        if platform.capabilities.static_shapes:
            sched = config.scheduler
            self.buckets = ShapeBuckets.from_config(config.buckets, sched.max_num_batched_tokens, sched.max_num_seqs,
                                                    -(-self._max_len // self.block_size))
            log.info("model runner: %s declares static shapes; steps are padded to buckets: %s", platform.name,
                     self.buckets.describe())
        self._states: dict[int, _SeqState] = {}
        #: The block tables of the sequences in ``_states``, one host row each.
        self.block_tables = BlockTables(config.scheduler.max_num_seqs, -(-self._max_len // self.block_size))
        self.kv_caches: list[torch.Tensor] = []
        #: Host copies of swapped-out blocks (allocated in swap mode only).
        self.swap = SwapCaches(platform, self.backend, config.cache, self.dtype, self.num_layers, self._cache_shape,
                               self.block_bytes())
        #: Captured decode graphs (built with the KV cache), or why decode steps run eagerly.
        self.graphs: DecodeGraphs | None = None
        self.graphs_off = graphs_unavailable(platform, self.backend, config, self.tp.size)
        if platform.capabilities.graphs:
            log.info("model runner: decode graphs %s", "off: " + self.graphs_off if self.graphs_off else "on")

    # -- KV cache ------------------------------------------------------------------------------
    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return self.backend.kv_cache_shape(num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_size)

    def block_bytes(self) -> int:
        return math.prod(self._cache_shape(1)) * torch.empty((), dtype=self.dtype).element_size() * self.num_layers

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
        shape = self._cache_shape(num_blocks)
        self.kv_caches = [self.platform.allocate(shape, self.dtype) for _ in range(self.num_layers)]
        if self.graphs_off is None:
            sizes = self.config.buckets.seq_buckets or powers_of_two(1, self.config.scheduler.max_num_seqs)
            self.graphs = DecodeGraphs(self.platform, self.model, self.kv_caches, sizes, self._max_len,
                                       self.block_size, self.device)

    @property
    def graph_replays(self) -> int:
        """Decode steps replayed from captured graphs so far."""
        return self.graphs.replays if self.graphs is not None else 0

    def num_swap_blocks(self, max_needed: int) -> int:
        """Host swap slots that fit ``swap_space`` GiB (``num_swap_blocks`` overrides), at most ``max_needed``."""
        return self.swap.num_slots(max_needed)

    def allocate_swap_space(self, num_slots: int) -> None:
        """Host memory for ``num_slots`` swapped-out blocks per layer (see :class:`SwapCaches`)."""
        self.swap.allocate(num_slots)

    # -- the persistent batch -------------------------------------------------------------------
    def _apply_plan_state(self, out: SchedulerOutput) -> None:
        """Drop finished sequences, register new ones, apply block-table changes."""
        tables = self.block_tables
        for seq_id in out.finished:
            self._states.pop(seq_id, None)
            tables.remove(seq_id)
        for ns in out.new_seqs:
            old = self._states.get(ns.seq_id)
            st = self._states[ns.seq_id] = _SeqState(ns.request_id, ns.index, list(ns.token_ids),
                                                     ns.num_prompt_tokens, ns.params, ns.eos_token_id,
                                                     old.generator if old else None)
            tables.add(ns.seq_id)
            if old is not None and old.gen_saved is not None and old.gen_saved[0] == len(st.token_ids):
                st.generator.set_state(old.gen_saved[1])  # its last sample was dropped: draw it again
            # only rank 0 masks and samples; the other ranks receive its tokens (jump-forward is off with TP)
            if getattr(ns.params, "structured_outputs", None) is not None and self.tp.rank == 0:
                # after a preemption the matcher survives if it followed the same tokens; else replay them
                keep = old.guided if old is not None and old.token_ids == st.token_ids else None
                st.guided = self.guided.seq(ns.params, st.token_ids[st.num_prompt_tokens:], keep)
        num_blocks, rows = tables.num_blocks, tables.rows
        for item in out.seqs:
            if item.new_blocks or item.blocks_from < num_blocks[rows[item.seq_id]]:
                tables.update(item.seq_id, item.blocks_from, item.new_blocks)

    @property
    def num_seq_states(self) -> int:
        """Sequences whose state the runner holds (for tests and debugging)."""
        return len(self._states)

    # -- one step ------------------------------------------------------------------------------
    def _step_inputs(self, out: SchedulerOutput, states: list["_SeqState"]) -> StepInputs:
        return StepInputs.build(out.seqs, [st.token_ids for st in states], self.block_tables, self.block_size)

    def _build(self, step: StepInputs):
        if self.buckets is not None:
            step = pad_step(self.buckets, step)
        dev = self.device
        meta = step.metadata(self.block_size, dev)
        qsl = [0, *accumulate(meta.query_lens_cpu)]
        self.backend.prepare(meta)
        ids = torch.from_numpy(step.input_ids).to(dev)
        pos_t = torch.from_numpy(step.positions).to(dev)
        return ids, pos_t, meta, qsl

    def _generator(self, st: "_SeqState", index: int) -> torch.Generator | None:
        """The seeded generator of continuation ``index`` (seed + index, as vLLM); kept in the state."""
        seed = st.params.seed
        if seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed((seed + index) & 0xFFFF_FFFF_FFFF_FFFF)
        return gen

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        with self.platform.inference_mode():
            return self._execute(out)

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        self._apply_plan_state(out)
        result = RunnerOutput()
        # the order SchedulerOutput documents: freed blocks are read before they are rewritten
        self.swap.swap_out(self.kv_caches, out.swap_out)
        if out.is_empty:
            return result
        states = [self._states[item.seq_id] for item in out.seqs]
        self.backend.copy_blocks(self.kv_caches, out.block_copies)
        self.swap.swap_in(self.kv_caches, out.swap_in)
        step = self._step_inputs(out, states)
        t0 = time.perf_counter()
        graph_logits = self.graphs.run_step(self.backend, out.seqs, states, step) if self.graphs is not None else None
        if graph_logits is not None:
            hidden, qsl = None, range(len(out.seqs) + 1)
        else:
            ids, positions, meta, qsl = self._build(step)
            t0 = time.perf_counter()
            hidden = self.model.forward(ids, positions, self.kv_caches, meta)

        sample_rows, sample_items, prompt_items, pool_items = [], [], [], []
        for i, (item, st) in enumerate(zip(out.seqs, states)):
            if item.prompt_logprobs:
                prompt_items.append((i, item, st))
            if getattr(st.params, "pooling", None):
                pool_items.append((i, item, st))
            if item.sample:
                sample_rows.extend([qsl[i + 1] - 1] * item.num_samples)
                sample_items.append((item, st))
        logits = None
        if graph_logits is not None:
            logits = DecodeGraphs.sample_logits(graph_logits, sample_rows)
        elif sample_rows:
            rows = sample_rows if self.buckets is None else pad_rows(self.buckets, sample_rows)
            logits = self.model.compute_logits(hidden[rows])
        self.platform.step_end()
        if logits is not None:
            if self.buckets is not None:  # a static-shape device samples on the host: no graph per batch
                logits = logits.cpu()[:len(sample_rows)]
            self._sample(logits, sample_items, result)
        for i, item, st in prompt_items:
            self._prompt_logprobs(hidden[qsl[i]:qsl[i + 1]], item, st, result)
        for i, item, st in pool_items:
            self._pool(hidden[qsl[i]:qsl[i + 1]], item, st, result)
        self.platform.synchronize()
        result.forward_seconds = time.perf_counter() - t0
        return result

    def _sample(self, logits: torch.Tensor, items, result: RunnerOutput) -> None:
        rows = []
        for item, st in items:
            if st.generator is None and st.params.seed is not None:
                st.generator = self._generator(st, st.index)
            if st.generator is not None:
                st.gen_saved = (len(st.token_ids), st.generator.get_state())
            history = st.params.repetition_penalty != 1.0 or st.params.presence_penalty != 0.0 \
                or st.params.frequency_penalty != 0.0
            out_ids = st.token_ids[st.num_prompt_tokens:] if history else ()
            prompt_ids = st.token_ids[:st.num_prompt_tokens] if history else ()
            num_generated = len(st.token_ids) - st.num_prompt_tokens
            rows.append((st.params, out_ids, prompt_ids, st.generator, num_generated, st.eos_token_id))
            # samples 1..: the children that fork from this one, each with its own generator
            st.child_generators = [self._generator(st, st.index + k) for k in range(1, item.num_samples)]
            rows.extend((st.params, out_ids, prompt_ids, g, num_generated, st.eos_token_id)
                        for g in st.child_generators)
        if self.tp.rank == 0:
            batch = SamplingBatch.build(rows, vocab_size=logits.shape[-1], device=logits.device)
            guided_rows, guided_seqs, row = [], [], 0
            for item, st in items:
                if st.guided is not None:
                    guided_rows.extend(range(row, row + item.num_samples))
                    guided_seqs.extend([st.guided] * item.num_samples)
                row += item.num_samples
            if guided_rows:
                logits = self.guided.mask(logits, guided_rows, guided_seqs, self.kernels.apply_token_bitmask)
            sout = self.sampler(logits, batch)
            tokens = sout.token_ids()
            lps = sout.row_logprobs()
        else:
            tokens, lps = [0] * len(rows), [None] * len(rows)
        if self.tp.size > 1:  # rank 0 sampled; every rank appends the same tokens to its states
            tokens = self.tp.broadcast(torch.tensor(tokens, dtype=torch.int64, device=self.device)).tolist()
        row = 0
        for item, st in items:
            n = item.num_samples
            result.sampled[item.seq_id] = toks = tokens[row:row + n]
            if st.params.logprobs is not None:
                result.logprobs[item.seq_id] = lps[row:row + n]
            row += n
            for k, (child_id, gen) in enumerate(zip(item.child_seq_ids, st.child_generators), start=1):
                child = self._states[child_id] = _SeqState(st.request_id, st.index + k, st.token_ids + [toks[k]],
                                                           st.num_prompt_tokens, st.params, st.eos_token_id, gen)
                self.block_tables.fork(item.seq_id, child_id)
                if st.guided is not None:  # each continuation follows the grammar on its own
                    child.guided = st.guided.fork()
                    self._advance_guided(child_id, child, toks[k], result)
            st.child_generators = []
            st.token_ids.append(toks[0])
            if st.guided is not None:
                self._advance_guided(item.seq_id, st, toks[0], result)

    def _advance_guided(self, seq_id: int, st: "_SeqState", token: int, result: RunnerOutput) -> None:
        """Advance the sequence's matcher with its sampled token (the last of ``st.token_ids``)."""
        done, jump = self.guided.advance(st.guided, token)
        if done:
            result.guided_done.append(seq_id)
        elif jump:
            st.token_ids[-1:] = jump
            result.jump[seq_id] = jump

    def _prompt_logprobs(self, hidden: torch.Tensor, item, st: "_SeqState", result: RunnerOutput) -> None:
        start, n = item.start, item.num_new
        # row p predicts token p+1; only positions inside the prompt count
        last = min(start + n, st.num_prompt_tokens - 1)
        records: list[TokenLogprobs | None] = [None] if start == 0 else []
        if last > start:
            logits = self.model.compute_logits(hidden[: last - start])
            targets = st.token_ids[start + 1:last + 1]
            records.extend(token_logprobs(logits, targets, st.params.prompt_logprobs))
        result.prompt_logprobs[item.seq_id] = records


    def _pool(self, hidden: torch.Tensor, item, st: "_SeqState", result: RunnerOutput) -> None:
        """Pool a pooling sequence's final hidden states; the prompt may come in several chunks
        (its sum is kept across steps), and it always starts at position 0 (no prefix cache)."""
        if st.params.pooling == "mean":
            part = hidden.float().sum(0)
            st.pool_sum = part if st.pool_sum is None else st.pool_sum + part
        if item.start + item.num_new >= st.num_prompt_tokens:
            vec = st.pool_sum / st.num_prompt_tokens if st.params.pooling == "mean" else hidden[-1].float()
            result.pooled[item.seq_id] = vec.tolist()
            st.pool_sum = None


@dataclass(eq=False)
class _SeqState:
    """The runner's copy of one sequence: its tokens (the runner appends what it samples) and
    sampling parameters, kept across steps so each step message carries only changes (its block
    table is a row of the runner's :class:`BlockTables`)."""

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: object
    eos_token_id: int | None
    generator: torch.Generator | None = None
    child_generators: list = field(default_factory=list)
    #: The structured-output state, a GuidedSeq (None: unconstrained).
    guided: object = None
    pool_sum: torch.Tensor | None = None
    #: ``(len(token_ids), generator state)`` before the latest seeded sample, to undo that draw
    #: when the engine discards the sample (overlap: the sequence was preempted while it ran).
    gen_saved: tuple | None = None
