"""Engine configuration: small frozen dataclasses per subsystem, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how: ``model`` is a local directory with config.json and safetensors.

    ``max_model_len`` defaults to the checkpoint's ``max_position_embeddings``.
    ``quantization``: an online mode for a float checkpoint (``int8``, ``w8a8``, ``fp8``) or the
    checkpoint's own format; None reads the format from ``config.json`` (see :mod:`tokenmill.quant.registry`).
    ``enforce_eager``: never capture decode steps into device graphs, even on a platform that
    declares ``graphs`` (see :mod:`tokenmill.engine.graphs`).
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    quantization: str | None = None
    enforce_eager: bool = False

    def __post_init__(self):
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if not self.model:
            raise ValueError("model must name a local checkpoint directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _positive("max_model_len", self.max_model_len, allow_none=True)
        if self.quantization is not None and (not isinstance(self.quantization, str) or not self.quantization.strip()):
            raise ValueError(f"quantization must be a format name such as 'int8' or 'fp8', got {self.quantization!r}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size in tokens, and its size.

    ``kv_cache_memory`` (bytes) fixes the pool's size; otherwise the platform's
    ``kv_cache_budget(memory_fraction)`` decides (by default ``memory_fraction`` of the
    device's free memory; the cpu platform takes less, see ``tokenmill_cpu.platform``).
    ``num_blocks`` overrides both (tests).

    ``swap_space`` (GiB per tensor-parallel rank) bounds the host memory that holds the KV
    blocks of sequences preempted with ``preemption_mode="swap"`` (page-locked where the
    platform declares ``pinned_memory``); ``num_swap_blocks`` overrides it (tests). Read only
    in swap mode; when it is full, a preempted sequence is recomputed instead.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    memory_fraction: float = 0.9
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    swap_space: float = 4.0
    num_swap_blocks: int | None = None

    def __post_init__(self):
        _positive("block_size", self.block_size)
        _positive("kv_cache_memory", self.kv_cache_memory, allow_none=True)
        _positive("num_blocks", self.num_blocks, allow_none=True)
        _positive("num_swap_blocks", self.num_swap_blocks, allow_none=True)
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float)) \
                or not 0 < self.swap_space <= 1024:
            raise ValueError(f"swap_space must be a number of GiB in (0, 1024], got {self.swap_space!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step and tokens per step (chunked prefill).

    ``preemption_mode``: what happens to a sequence preempted when the KV pool runs dry:
    ``"recompute"`` frees its blocks and computes them again when it resumes; ``"swap"``
    copies its blocks to host memory (``CacheConfig.swap_space``) and back when it resumes.

    ``overlap``: schedule step N+1 while step N runs and apply N's results while N+1 runs
    (SGLang's overlap scheduler, vLLM's async scheduling); the output is the same as without.
    ``None`` (the default) lets the platform decide: on where it declares ``async_execution``.
    With ``preemption_mode="swap"`` the engine steps without overlap: a sequence swapped out
    while its step runs would need that step's KV and sample undone on the host copy.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting: int | None = None
    preemption_mode: str = "recompute"
    overlap: bool | None = None

    def __post_init__(self):
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting", self.max_waiting, allow_none=True)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")


PREEMPTION_MODES = ("recompute", "swap")


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks run the model and how they are placed.

    ``tensor_parallel_size`` ranks each hold a slice of every layer (heads, intermediate
    size, vocabulary) and meet in ``torch.distributed`` collectives over the platform's
    ``dist_backend``. ``distributed_executor_backend``: ``"uni"`` (one rank, in the engine
    process), ``"mp"`` (rank 0 in the engine process, one local worker process per other
    rank) or ``"ray"`` (the other ranks as Ray actors on the nodes of a running Ray
    cluster); ``None`` picks ``"uni"`` for one rank and ``"mp"`` otherwise.
    ``distributed_timeout`` bounds every collective and the workers' start-up (seconds),
    so a dead or stuck rank fails the step instead of hanging it.
    """

    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    distributed_timeout: float = 120.0

    def __post_init__(self):
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {backend!r}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("distributed_executor_backend 'uni' runs one rank; use 'mp' or 'ray' for "
                             f"tensor_parallel_size {self.tensor_parallel_size}")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout must be positive, got {self.distributed_timeout}")

    @property
    def executor_backend(self) -> str:
        """The backend in effect (``distributed_executor_backend`` with its default applied)."""
        if self.distributed_executor_backend:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"


def _buckets(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value:
        raise ValueError(f"{name} must be a non-empty tuple of positive integers, got {value!r}")
    for v in value:
        _positive(name, v)


@dataclass(frozen=True)
class BucketConfig:
    """Shape buckets of a static-shape platform (see :mod:`tokenmill.engine.buckets`).

    Each step is padded to the smallest bucket that fits its number of tokens, of
    sequences and its block-table width (blocks per sequence). None: powers of two up to
    ``max_num_batched_tokens`` (from 16), ``max_num_seqs`` and the blocks of ``max_model_len``.
    Read when the platform declares ``static_shapes``; ``seq_buckets`` also sizes the captured
    decode graphs of a platform that declares ``graphs``.
    """

    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    width_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        for f in fields(self):
            _buckets(f.name, getattr(self, f.name))


@dataclass(frozen=True)
class GuidedConfig:
    """Structured output: the backend a request gets when it names none (``auto``: xgrammar,
    falling back to outlines for what xgrammar cannot compile), and whether constrained requests
    use jump-forward decoding (forced text appended as one chunk instead of one step per token)."""

    backend: str = "auto"
    jump_forward: bool = True

    def __post_init__(self):
        from tokenmill.guided.params import BACKEND_CHOICES

        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"structured_output_backend must be one of {', '.join(BACKEND_CHOICES)}, "
                             f"got {self.backend!r}")
        if not isinstance(self.jump_forward, bool):
            raise ValueError(f"jump_forward must be a bool, got {self.jump_forward!r}")


#: ``from_kwargs`` names of GuidedConfig's fields (CLI-style).
_GUIDED_KWARGS = {"structured_output_backend": "backend", "jump_forward": "jump_forward"}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; build it with :meth:`from_kwargs` using CLI-style names."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    guided: GuidedConfig = field(default_factory=GuidedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    device: str = "auto"
    #: Seeds the sampling generator shared by requests that bring no ``seed`` of their own.
    seed: int = 0
    #: Run the core's reference ops and attention even where a plugin registered faster ones.
    reference_ops: bool = False

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Split flat options (``dtype``, ``block_size``, ``max_num_seqs``, ``structured_output_backend``,
        ``jump_forward``...) into the sub-configs."""
        parts = {}
        for sub in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, BucketConfig):
            names = {f.name for f in fields(sub)}
            parts[sub] = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        guided = {_GUIDED_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _GUIDED_KWARGS}
        top = {k: kwargs.pop(k) for k in list(kwargs) if k in ("device", "seed", "reference_ops")}
        if kwargs:
            raise ValueError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return cls(model=ModelConfig(model=model, **parts[ModelConfig]), cache=CacheConfig(**parts[CacheConfig]),
                   scheduler=SchedulerConfig(**parts[SchedulerConfig]), guided=GuidedConfig(**guided),
                   parallel=ParallelConfig(**parts[ParallelConfig]), buckets=BucketConfig(**parts[BucketConfig]),
                   **top)
