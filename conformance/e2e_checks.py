"""End to end: tiny local models must generate the same greedy tokens as on the reference platform.

The reference is the core's reference ops and attention in float32 on the CPU, driven by
:class:`tokenmill.testing.simple_runner.SimpleRunner`. The plugin's side runs the same
loop with only the plugin's own kernels (the reference filling in the other ops) and
its best attention backend for the model, on its device (or on CPU tensors under the
interpreter). Prompts are prefilled in chunks mixed with other sequences' decodes.
When the platform is available, the real engine (:class:`tokenmill.engine.engine_core.EngineCore`,
scheduler and all) runs the same prompts on it too.

The tiny models are random-weight checkpoints built locally and cached on disk
(:mod:`tokenmill.testing.tiny_models`): ``llama`` (Llama-3 rope scaling, GQA),
``qwen3`` (q/k norm, head size 64, MQA) and ``mistral`` (sliding window, head size 64).
"""
from __future__ import annotations

import functools

from tokenmill.conformance.results import Check, Skip

MODELS = ("llama", "qwen3", "mistral")
#: Interpreter runs are slow per kernel launch: one model (GQA, sliding window, head size 64).
INTERPRETER_MODELS = ("mistral",)
PROMPT_LENS = (5, 19, 40)
MAX_NEW_TOKENS = 8
CHUNK = 16
BLOCK_SIZE = 16


def _prompts(vocab_size: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1234)
    # Ids 0-3 are special tokens of the test tokenizer; keep prompts to ordinary ones.
    return [torch.randint(4, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@functools.lru_cache(maxsize=None)
def reference_tokens(arch: str, dtype_name: str) -> tuple:
    """Greedy tokens of the reference platform for ``arch`` (cached per process)."""
    import torch

    from tokenmill.models.loader import load_config, load_model
    from tokenmill.models.registry import ARCHITECTURES
    from tokenmill.testing.simple_runner import SimpleRunner, reference_context
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    dtype = getattr(torch, dtype_name)
    ctx = reference_context(dtype=dtype)
    model = load_model(path, ctx, dict(ARCHITECTURES))
    runner = SimpleRunner(model, ctx.attention_backend, torch.device("cpu"), dtype, block_size=BLOCK_SIZE,
                          max_seqs=len(PROMPT_LENS), max_tokens_per_seq=64)
    prompts = _prompts(load_config(path).vocab_size)
    out = runner.generate(prompts, MAX_NEW_TOKENS, chunk_size=CHUNK)
    return tuple(tuple(toks) for toks, _ in out)


@functools.lru_cache(maxsize=None)
def hf_tokens(arch: str) -> tuple:
    """Greedy tokens of HF transformers (float32, CPU) on the same prompts (cached per process)."""
    from tokenmill.models.loader import load_config
    from tokenmill.testing import hf_greedy, make_tiny_model

    path = make_tiny_model(arch)
    return tuple(tuple(t) for t in hf_greedy(path, _prompts(load_config(path).vocab_size), MAX_NEW_TOKENS))


def _describe_mismatch(got, want) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if list(g) != list(w):
            first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return (f"prompt {i} ({PROMPT_LENS[i]} tokens) diverges at new token {first}: "
                    f"got {list(g)}, reference {list(w)}")
    return f"got {got}, reference {want}"


def _run_engine(engine, prompts: list[list[int]], params, tag: str = "") -> tuple:
    """Add the prompts (``params``: one SamplingParams for all, or one each), step until done;
    the new tokens per prompt. ``tag`` prefixes the request ids (to run again on one engine)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    tokens = {f"{tag}{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, per_prompt[i])
    while engine.has_unfinished():
        for u in engine.step():
            tokens[u.request_id].extend(u.new_token_ids)
    return tuple(tuple(t) for t in tokens.values())


def _choose_backend(target, platform_name: str, spec):
    from tokenmill.attention.reference import ReferenceAttention

    notes = []
    for backend in sorted(target.backends_for(platform_name), key=lambda b: -b.priority):
        why = backend.supports(spec)
        if why is None:
            return backend, ""
        notes.append(why)
    if notes:
        return ReferenceAttention, f"; reference attention (the plugin's refuse: {'; '.join(notes)})"
    return ReferenceAttention, ""


def simple_runner_check(target, platform_name: str, arch: str, device, dtype_name: str) -> str:
    import torch

    from tokenmill.models.interface import ModelContext
    from tokenmill.models.loader import load_config, load_model
    from tokenmill.models.registry import ARCHITECTURES
    from tokenmill.ops.reference import REFERENCE_OPS
    from tokenmill.ops.registry import KernelImpl, Kernels
    from tokenmill.testing.simple_runner import SimpleRunner
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    hf_config = load_config(path)
    archs = dict(ARCHITECTURES)
    model_cls = next(archs[n] for n in hf_config.architectures if n in archs)
    spec = model_cls.attention_spec_for(hf_config, dtype_name)
    backend, note = _choose_backend(target, platform_name, spec)
    impls = [KernelImpl(op, "*", fn, provider="reference", priority=-1000) for op, fn in REFERENCE_OPS.items()]
    kernels = Kernels(platform_name, impls + target.kernels_for(platform_name), dtype_name)
    dtype = getattr(torch, dtype_name)
    ctx = ModelContext(kernels=kernels, attention_backend=backend, dtype=dtype, device=torch.device(device))
    model = load_model(path, ctx, archs)
    runner = SimpleRunner(model, backend, torch.device(device), dtype, block_size=BLOCK_SIZE,
                          max_seqs=len(PROMPT_LENS), max_tokens_per_seq=64)
    got = tuple(tuple(t) for t, _ in runner.generate(_prompts(hf_config.vocab_size), MAX_NEW_TOKENS, chunk_size=CHUNK))
    want = reference_tokens(arch, dtype_name)
    assert got == want, f"{arch}: {_describe_mismatch(got, want)}"
    ours = sorted(op for op, who in kernels.providers.items() if who != "reference")
    return (f"{sum(map(len, got))} greedy tokens identical; attention {backend.name}{note}; "
            f"plugin ops: {', '.join(ours) or 'none (reference)'}")


def engine_check(target, platform_name: str, arch: str, dtype_name: str) -> str:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.models.loader import load_config
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    config = EngineConfig.from_kwargs(str(path), device=platform_name, dtype=dtype_name, block_size=BLOCK_SIZE,
                                      max_num_batched_tokens=CHUNK * 2, kv_cache_memory=16 << 20, max_model_len=256)
    engine = EngineCore(config, plugin_manager=target.pm)
    prompts = _prompts(load_config(path).vocab_size)
    got = _run_engine(engine, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    want = reference_tokens(arch, dtype_name)
    assert got == want, f"{arch} through the engine: {_describe_mismatch(got, want)}"
    hf = " and to HF transformers'" if dtype_name == "float32" else ""
    if hf:
        assert got == hf_tokens(arch), f"{arch} through the engine vs HF: {_describe_mismatch(got, hf_tokens(arch))}"
    runner = engine.runner
    return (f"engine on {platform_name}: {sum(map(len, got))} greedy tokens identical to the reference's{hf}; "
            f"attention {runner.backend.name}; kernels {runner.kernels.providers}")


#: The workload of the static-shape check: the e2e prompts, chunked, with small buckets.
STATIC_BUCKETS = dict(token_buckets=(16, 32), seq_buckets=(1, 2, 4), width_buckets=(1, 2, 4, 8, 16))


def static_shape_check(target, platform, arch: str = MODELS[0]) -> str:
    """Workload W through the engine on a static-shape platform: compilations bounded by the buckets.

    Counts compilations through ``platform.compile_count()``: running W must compile at
    most one graph per bucket combination its steps used, and running W again nothing.
    """
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.models.loader import load_config
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    dtype_name = "float32" if "float32" in platform.capabilities.dtypes else platform.capabilities.dtypes[0]
    config = EngineConfig.from_kwargs(str(path), device=platform.name, dtype=dtype_name, block_size=BLOCK_SIZE,
                                      max_num_batched_tokens=CHUNK * 2, max_num_seqs=4, kv_cache_memory=16 << 20,
                                      max_model_len=256, enable_prefix_caching=False, **STATIC_BUCKETS)
    engine = EngineCore(config, plugin_manager=target.pm)
    buckets = engine.runner.buckets
    assert buckets is not None, "static_shapes declared but the model runner does not pad to buckets"
    prompts = _prompts(load_config(path).vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)

    before = platform.compile_count()
    assert isinstance(before, int), f"static_shapes declared but compile_count() returned {before!r}, not an int"
    steps0 = engine.stats().steps
    got = _run_engine(engine, prompts, params, "a")
    first = platform.compile_count() - before
    steps = engine.stats().steps - steps0
    again = _run_engine(engine, prompts, params, "b")
    second = platform.compile_count() - before - first
    assert got == again == reference_tokens(arch, dtype_name), \
        f"padded steps changed the tokens: {_describe_mismatch(got, reference_tokens(arch, dtype_name))}"
    used = len(buckets.seen)
    assert first <= used, (f"W ({steps} steps) compiled {first} graphs but used only {used} bucket combinations "
                           f"({buckets.describe()}): shapes leak past the buckets")
    assert second == 0, f"running W again compiled {second} new graphs: some shape is not bucketed"
    return (f"W = {len(prompts)} prompts x {MAX_NEW_TOKENS} tokens, {steps} steps: compiled {first} graphs for "
            f"{used} bucket combinations used (of {buckets.num_combinations}: {buckets.describe()}); "
            f"W again: {second} new")


def graph_check(target, platform, arch: str = MODELS[0]) -> str:
    """The engine with decode graphs against the same engine with ``enforce_eager``: same tokens.

    Fails when the platform declares ``graphs`` but no decode step was replayed (the reason
    the runner gives), or a capture failed.
    """
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.models.loader import load_config
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    dtype_name = "float32" if "float32" in platform.capabilities.dtypes else platform.capabilities.dtypes[0]
    prompts = _prompts(load_config(path).vocab_size)
    # different lengths, so the decode batch shrinks (3, 2, 1) and several buckets replay
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS - 3 * i, ignore_eos=True)
              for i in range(len(prompts))]

    def run(eager: bool):
        config = EngineConfig.from_kwargs(str(path), device=platform.name, dtype=dtype_name, block_size=BLOCK_SIZE,
                                          max_num_batched_tokens=CHUNK * 2, max_num_seqs=4, kv_cache_memory=16 << 20,
                                          max_model_len=256, enforce_eager=eager)
        engine = EngineCore(config, plugin_manager=target.pm)
        return engine, _run_engine(engine, prompts, params)

    eager_engine, want = run(True)
    engine, got = run(False)
    graphs = engine.runner.graphs
    assert graphs is not None, f"graphs declared but decode steps run eagerly: {engine.runner.graphs_off}"
    assert graphs.failed is None, f"capturing a decode graph failed: {graphs.failed}"
    assert graphs.replays > 0, "graphs declared but no decode step was replayed"
    assert got == want, f"replayed decode steps changed the tokens: {_describe_mismatch(got, want)}"
    ref = tuple(tuple(t[:p.max_tokens]) for t, p in zip(reference_tokens(arch, dtype_name), params))
    assert got == ref, f"decode graphs vs the reference platform: {_describe_mismatch(got, ref)}"
    return (f"{graphs.replays} of {engine.stats().steps} steps replayed from graphs captured at batch sizes "
            f"{sorted(graphs.graphs)} (attention {engine.runner.backend.name}); {sum(map(len, got))} greedy tokens "
            f"identical to the eager engine's ({eager_engine.stats().graph_replays} replays there) and the reference's")


def overlap_check(target, platform, arch: str = MODELS[0]) -> str:
    """The engine with overlap forced on and off on the platform: the same greedy tokens, and
    with overlap some plan was made while the previous step was still in flight."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.models.loader import load_config
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.testing import record_plan_events
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    dtype_name = "float32" if "float32" in platform.capabilities.dtypes else platform.capabilities.dtypes[0]
    prompts = _prompts(load_config(path).vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)

    def run(overlap: bool):
        config = EngineConfig.from_kwargs(str(path), device=platform.name, dtype=dtype_name, block_size=BLOCK_SIZE,
                                          max_num_batched_tokens=CHUNK * 2, max_model_len=256,
                                          kv_cache_memory=16 << 20, overlap=overlap)
        engine = EngineCore(config, plugin_manager=target.pm)
        events = record_plan_events(engine.scheduler)
        got = _run_engine(engine, prompts, params)
        engine.shutdown()
        return got, "".join(events).count("SS")

    want, _ = run(False)
    got, ahead = run(True)
    assert ahead > 0, "with overlap on, no step was planned while another was in flight"
    assert got == want, f"overlap changed the tokens: {_describe_mismatch(got, want)}"
    return f"{ahead} plans made while a step ran; {sum(map(len, got))} greedy tokens identical to the engine without overlap"


def swap_check(target, platform, arch: str = MODELS[0]) -> str:
    """Preemption by swap on the platform: a pool too small for the batch, the reference's tokens.

    Blocks must actually go to the host swap space and back, and that space must be
    page-locked when the platform declares ``pinned_memory``.
    """
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.models.loader import load_config
    from tokenmill.sampling_params import SamplingParams
    from tokenmill.testing.tiny_models import make_tiny_model

    path = make_tiny_model(arch)
    dtype_name = "float32" if "float32" in platform.capabilities.dtypes else platform.capabilities.dtypes[0]
    # 18 blocks of 4 tokens: the three prompts (5, 19, 40 tokens) start together in 17 and grow to 23
    config = EngineConfig.from_kwargs(str(path), device=platform.name, dtype=dtype_name, block_size=4,
                                      max_num_batched_tokens=sum(PROMPT_LENS), num_blocks=18, max_model_len=256,
                                      enable_prefix_caching=False, preemption_mode="swap", num_swap_blocks=16)
    engine = EngineCore(config, plugin_manager=target.pm)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    got = _run_engine(engine, _prompts(load_config(path).vocab_size), params)
    want = reference_tokens(arch, dtype_name)
    assert got == want, f"with preemption by swap: {_describe_mismatch(got, want)}"
    stats = engine.stats()
    assert stats.swapped_out_blocks > 0, "the 18-block pool was meant to swap sequences out"
    assert stats.swapped_in_blocks == stats.swapped_out_blocks and stats.num_swapped == 0
    pinned = engine.runner.swap.caches[0].is_pinned()
    if platform.capabilities.pinned_memory:
        assert pinned, "pinned_memory declared but the swap space is not page-locked"
    return (f"{stats.num_preemptions} preemptions, {stats.swapped_out_blocks} blocks swapped out and back "
            f"({'page-locked' if pinned else 'pageable'} host memory); {sum(map(len, got))} greedy tokens "
            f"identical to the reference's")


def e2e_checks(target, platform, platform_name: str, device, device_skip: str | None, dtypes: list[str]) -> list[Check]:
    """The end-to-end checks for ``platform_name``: simple loop per tiny model, plus the engine when it can run."""
    dtype_name = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else None)
    models = INTERPRETER_MODELS if target.interpret else MODELS
    checks = []
    for arch in models:
        def run(arch=arch):
            if device_skip:
                raise Skip(device_skip)
            if dtype_name is None:
                raise Skip("no dtype to run in")
            return simple_runner_check(target, platform_name, arch, device, dtype_name)
        checks.append(Check(f"e2e/{platform_name}/{arch}", "e2e",
                            f"tiny {arch}: greedy tokens identical to the reference platform", run))

    def engine(arch=MODELS[0]):
        if target.interpret:
            raise Skip("interpreter mode: the engine runs on the platform's device, which is not used here")
        if platform is None:
            raise Skip(f"platform {platform_name} is not installed")
        avail = platform.availability()
        if not avail:
            raise Skip(f"platform {platform_name} is not available here: {avail.reason}")
        if dtype_name is None:
            raise Skip("no dtype to run in")
        return engine_check(target, platform_name, arch, dtype_name)

    checks.append(Check(f"e2e/{platform_name}/engine-{MODELS[0]}", "e2e",
                        "the engine on this platform generates the reference's greedy tokens", engine))

    def swap():
        if target.interpret:
            raise Skip("interpreter mode: the engine runs on the platform's device, which is not used here")
        if platform is None or not platform.availability():
            raise Skip(f"platform {platform_name} is not available here")
        return swap_check(target, platform)

    checks.append(Check(f"e2e/{platform_name}/swap-{MODELS[0]}", "e2e",
                        "preemption by swap (--preemption-mode swap) keeps the reference's greedy tokens", swap))
    return checks
