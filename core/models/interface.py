"""What every model implementation provides to the model runner.

A model class is registered through the ``tokenmill_model_architectures`` hook under the
architecture name found in ``config.json``. The runner builds it, streams the
checkpoint's tensors into :meth:`CausalLM.load_weights`, allocates one KV cache tensor
per layer as the attention backend asks, and then calls :meth:`CausalLM.forward` once
per step on the flattened batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tokenmill.attention.interface import AttentionSpec


@dataclass
class ModelContext:
    """What a model needs to build itself.

    ``kernels``: the resolved :class:`tokenmill.ops.registry.Kernels` for the platform.
    ``attention_backend``: the chosen :class:`AttentionBackend` subclass (instantiate one per layer).
    ``dtype``: the torch dtype for weights and activations; ``device``: the torch.device.
    ``quantization``: a quantization method instance, or None.
    ``float_method``: the method of the linear layers left in float (every layer of a float
    checkpoint); None: the core's ``F.linear`` method.
    ``tp``: the :class:`~tokenmill.executor.parallel.TensorParallelGroup` this rank belongs to
    (rank 0 of 1 unless tensor parallelism is on); layers take their slice from it.
    """

    kernels: Any
    attention_backend: type
    dtype: Any
    device: Any
    quantization: Any = None
    tp: Any = None
    float_method: Any = None

    def __post_init__(self):
        if self.tp is None:
            from tokenmill.executor.parallel import SINGLE

            self.tp = SINGLE


class CausalLM:
    """Interface of a decoder-only model (subclasses are ``torch.nn.Module`` too).

    ``__init__(hf_config, ctx: ModelContext)``.
    """

    @classmethod
    def attention_spec_for(cls, hf_config, dtype: str) -> AttentionSpec:
        """The attention configuration this architecture needs, before it is built.

        The runner uses it to pick the attention backend that the model then instantiates.
        """
        raise NotImplementedError

    def attention_spec(self) -> tuple[int, AttentionSpec]:
        """``(num_layers, spec)``: how many KV-cache layers and their attention configuration."""
        raise NotImplementedError

    def forward(self, input_ids, positions, kv_caches: list, meta) -> Any:
        """Run the flattened batch: ``input_ids``, ``positions`` int64 ``[T]`` -> hidden states ``[T, hidden]``.

        ``kv_caches[i]`` is layer ``i``'s cache tensor; ``meta`` is the step's
        :class:`AttentionMetadata`.
        """
        raise NotImplementedError

    def compute_logits(self, hidden) -> Any:
        """Hidden states ``[N, hidden]`` -> float32 logits ``[N, vocab]``."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Consume ``(checkpoint_name, tensor)`` pairs (HF names); cast and place them."""
        raise NotImplementedError
