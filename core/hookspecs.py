"""The tokenmill plugin contract: one hook per registry.

A plugin is a module named by an entry point in the group ``tokenmill``. It sets
``TOKENMILL_CONTRACT = "MAJOR.MINOR"`` (see :mod:`tokenmill.version`) and defines any of
the hooks below with ``@tokenmill.hookimpl``. The core registers its own built-ins
(reference kernels, reference attention, models) through these same hooks.

Every hook returns a list (possibly empty); the manager concatenates the lists of all
plugins. Hooks are called once, at start-up; the hot path uses the plain objects they
return, never ``pm.hook``. New keyword arguments may be added to a hook within a major
version; pluggy lets an implementation accept fewer arguments than its spec.
"""
from __future__ import annotations

import pluggy

PROJECT = "tokenmill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokenmill_platforms():
    """Return a list of :class:`tokenmill.platform.Platform` instances this plugin provides.

    Each platform has a unique ``name`` (the value of ``--device``), a torch device type,
    a ``priority`` for ``--device auto`` and an ``availability()`` that answers without
    raising, giving the reason when it is unavailable. Constructing a platform must be
    cheap and must not import vendor libraries (an XLA backend, a vendor's torch extension)
    eagerly: import them in ``availability()`` or later. GPU-like devices subclass
    :class:`tokenmill.accelerator.AcceleratorPlatform` and add only their vendor specifics.

    When the engine starts on a platform, the model runner calls, in this order:
    ``device()``; ``capabilities`` (dtype check; ``static_shapes`` turns on shape buckets);
    ``wrap_model(model)`` once, after the weights are loaded; ``kv_cache_budget()`` or
    ``memory_info()`` to size the KV cache, then ``allocate()`` once per layer; with
    ``--preemption-mode swap``, ``pin_memory()`` once per layer on the host swap space
    (page-locked where ``pinned_memory`` is declared). Per step: the forward, the sampled
    rows' logits, then ``step_end()`` before anything is read on the host. With ``graphs``
    (and a ``graph_capturable`` attention backend, one rank, no ``--enforce-eager``): the
    first decode-only step of each batch-size bucket calls ``graph_pool()`` (once) and
    ``capture_graph(fn, pool)``, then ``replay()`` on the result; later decode steps of that
    size only ``replay()``. ``compile_count()`` is read by the conformance suite
    (static-shape platforms).
    """


@hookspec
def tokenmill_attention_backends():
    """Return a list of :class:`tokenmill.attention.interface.AttentionBackend` subclasses.

    Each class names the platforms it serves in ``device_types`` (platform names such as
    ``"cpu"``, ``"cuda"``), a ``priority`` among backends for the same platform, and
    declares what it supports (head sizes, dtypes, sliding window, GQA) through
    ``supports()``. The engine picks the highest-priority backend whose ``supports()``
    accepts the model; the core's reference backend serves every platform at priority 0.
    """


@hookspec
def tokenmill_kernels():
    """Return a list of :class:`tokenmill.ops.registry.KernelImpl` (op name, platform name, function).

    The op names and their exact signatures are in :mod:`tokenmill.ops.registry` (``OPS``).
    An implementation must match the core's reference op within the conformance suite's
    tolerances. Ops a plugin does not register fall back to the reference. When several
    plugins register the same (op, platform), the highest ``priority`` wins.
    """


@hookspec
def tokenmill_quantization_methods():
    """Return a list of :class:`tokenmill.quant.interface.QuantizationMethod` subclasses.

    A class declares the checkpoint formats it loads (``checkpoint_formats``: the
    ``quant_method`` of ``config.json``'s ``quantization_config``, e.g. ``"gptq"``, ``"awq"``,
    ``"fp8"``, ``"compressed-tensors"``) and the online modes it applies to a float checkpoint
    (``online_modes``: values of ``--quantization``, e.g. ``"int8"``, ``"w8a8"``, ``"fp8"``),
    the platforms it serves (``device_types``, ``"*"`` for all) and a ``priority``. Per format
    and platform the engine instantiates the highest-priority class whose cheap classmethod
    ``available(platform)`` returns None and whose constructor ``cls(format, quant_config,
    dtype)`` accepts the configuration (raising ``ValueError`` that names what it does not
    support: the next class is tried, the core's reference last). The instance creates each
    linear layer's parameters (``create_weights(layer, spec)``), post-processes them after
    loading (``process_weights_after_loading(layer)``: quantize, repack for a kernel) and
    does the matmul (``apply(layer, x, bias, expert)``), which must match the core's
    reference implementation of the format within the conformance suite's tolerances.
    The core registers a reference (dequantize, then matmul) class for every format; a
    plugin adds a faster one by subclassing it at a higher priority for its platform.
    The online mode ``"none"`` is the float linear itself: a subclass of
    :class:`tokenmill.quant.UnquantizedMethod` serving ``"none"`` replaces ``F.linear`` for
    every layer left unquantized on its platform (its constructor refuses the dtypes it
    does not serve). The full contract is in :mod:`tokenmill.quant.interface`.
    """


@hookspec
def tokenmill_guided_decoding_backends():
    """Return a list of :class:`tokenmill.guided.interface.GuidedBackend` subclasses.

    A backend has a ``name`` (``"xgrammar"``, ``"outlines"``: the values of
    ``--structured-output-backend`` and of a request's ``backend``), the spec ``kinds`` it
    compiles, a cheap classmethod ``validate(spec)`` and ``compile(spec)``, which turns a JSON
    schema, json_object, regex, choice list, grammar or structural tag into a compiled grammar
    whose per-sequence matchers fill the allowed-token bitmask, accept and roll back tokens,
    report termination and return the forced continuation (jump-forward). The full contract
    is in :mod:`tokenmill.guided.interface`. A later registration of a name replaces an
    earlier one, so a plugin may override a built-in backend.
    """


@hookspec
def tokenmill_model_architectures():
    """Return a list of ``(architecture_name, model_class)`` pairs.

    ``architecture_name`` is the value found in a checkpoint's ``config.json``
    ``architectures`` list (``"LlamaForCausalLM"``). ``model_class`` follows
    :class:`tokenmill.models.interface.CausalLM`. A later registration of the same
    name replaces an earlier one, so a plugin may override a built-in model.
    """
