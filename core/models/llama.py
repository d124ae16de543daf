"""Llama-family decoder models (Llama, Mistral; the base of Qwen2/Qwen3/Mixtral).

One configurable decoder: fused qkv and gate/up projections, optional qkv bias and
per-head q/k RMSNorm, per-layer sliding window, a replaceable MLP block. Subclasses
only change class attributes and the few hooks below. Numerics follow HF transformers:
RMSNorm in float32, residual additions in the model dtype, logits in float32.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tokenmill.attention.interface import AttentionSpec
from tokenmill.models.interface import CausalLM, ModelContext
from tokenmill.models.layers import Embedding, Linear, RMSNorm, check_all_loaded
from tokenmill.models.tensor_parallel import local_sizes, shard_tensor
from tokenmill.ops.rope import cos_sin_cache_from_hf


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional q/k norm, rotary, paged attention, output projection."""

    def __init__(self, config, ctx: ModelContext, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 sliding_window: int | None, prefix: str = ""):
        super().__init__()
        sizes = local_sizes(config, ctx.tp)  # this rank's heads (all of them without tensor parallelism)
        self.num_heads = sizes.num_heads
        self.num_kv_heads = sizes.num_kv_heads
        self.head_size = sizes.head_size
        self.tp = ctx.tp
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, ctx,
                               shard_sizes={"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
                               prefix=f"{prefix}.qkv_proj",
                               shard_prefixes=tuple(f"{prefix}.{n}_proj" for n in "qkv"))
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias, ctx, prefix=f"{prefix}.o_proj")
        if qk_norm:
            self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps, ctx)
            self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps, ctx)
        else:
            self.q_norm = self.k_norm = None
        self.kernels = ctx.kernels
        self.spec = AttentionSpec(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                  head_size=self.head_size, dtype=_dtype_name(ctx.dtype),
                                  sliding_window=sliding_window)
        self.attn = ctx.attention_backend(self.spec)
        self.layer_idx = layer_idx

    def forward(self, positions, hidden, kv_cache, meta, cos_sin_cache):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            n = hidden.shape[0]
            q = self.q_norm(q.reshape(-1, self.head_size)).view(n, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_size)).view(n, self.kv_size)
        q, k = self.kernels.rotary_embedding(positions, q, k, cos_sin_cache, self.head_size, True)
        out = self.attn.forward(q.view(-1, self.num_heads, self.head_size),
                                k.view(-1, self.num_kv_heads, self.head_size),
                                v.reshape(-1, self.num_kv_heads, self.head_size), kv_cache, meta)
        return self.tp.all_reduce(self.o_proj(out))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: fused gate/up projection, ``silu_and_mul``, down projection."""

    def __init__(self, config, ctx: ModelContext, prefix: str = ""):
        super().__init__()
        inter = local_sizes(config, ctx.tp).intermediate
        bias = bool(getattr(config, "mlp_bias", False))
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r}; only silu is supported")
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias, ctx, shard_sizes={0: inter, 1: inter},
                                   prefix=f"{prefix}.gate_up_proj",
                                   shard_prefixes=(f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.down_proj = Linear(inter, config.hidden_size, bias, ctx, prefix=f"{prefix}.down_proj")
        self.kernels = ctx.kernels
        self.tp = ctx.tp

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual stream is carried through ``fused_add_rms_norm``."""

    def __init__(self, config, ctx: ModelContext, layer_idx: int, model_cls):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(config, ctx, layer_idx, qkv_bias=model_cls.qkv_bias(config),
                                        o_bias=model_cls.o_bias(config),
                                        qk_norm=model_cls.qk_norm,
                                        sliding_window=model_cls.layer_sliding_window(config, layer_idx),
                                        prefix=f"{prefix}.self_attn")
        self.mlp_name = model_cls.mlp_name
        self.add_module(self.mlp_name, model_cls.make_mlp(config, ctx, prefix=f"{prefix}.{model_cls.mlp_name}"))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def forward(self, positions, hidden, residual, kv_cache, meta, cos_sin_cache):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return getattr(self, self.mlp_name)(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config, ctx: ModelContext, model_cls):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, ctx)  # vocab-parallel
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # One float32 table shared by every layer (a buffer: it moves with the model, is not loaded).
        self.register_buffer("cos_sin_cache", cos_sin_cache_from_hf(config, head_size, device=ctx.device),
                             persistent=False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ctx, i, model_cls)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def forward(self, input_ids, positions, kv_caches, meta):
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, self.cos_sin_cache)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module, CausalLM):
    """Llama (1/2/3): see :class:`tokenmill.models.interface.CausalLM`.

    Subclass hooks: ``qk_norm`` (per-head q/k RMSNorm before rotary), ``qkv_bias(config)``, ``o_bias(config)``,
    ``layer_sliding_window(config, i)``, ``make_mlp(config, ctx, prefix)`` with ``mlp_name`` (the
    checkpoint's module name; ``prefix`` is its checkpoint name), and ``rename_weight(name)`` for
    checkpoint name mapping. Every linear layer is a :class:`~tokenmill.models.layers.Linear`,
    so quantized checkpoints load through the layer's quantization method.
    """

    qk_norm = False
    mlp_name = "mlp"
    #: (fused parameter fragment, checkpoint fragment, shard id)
    stacked_params = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    )

    @classmethod
    def qkv_bias(cls, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def o_bias(cls, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int) -> int | None:
        return None

    @classmethod
    def make_mlp(cls, config, ctx, prefix: str = ""):
        return LlamaMLP(config, ctx, prefix)

    def __init__(self, hf_config, ctx: ModelContext):
        super().__init__()
        self.hf_config = hf_config
        self.ctx = ctx
        self.model = LlamaModel(hf_config, ctx, type(self))
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = Linear(hf_config.hidden_size, local_sizes(hf_config, ctx.tp).vocab, False, ctx,
                                  prefix="lm_head")

    @classmethod
    def attention_spec_for(cls, hf_config, dtype_name: str) -> AttentionSpec:
        """The spec this class will ask for with ``hf_config`` (before building it: to pick a backend).

        ``sliding_window`` is set when any layer slides (so that a backend without sliding
        windows is not picked); layers may differ (Qwen2 ``max_window_layers``), so it must
        not be taken to mean that every layer forgets tokens outside the window.
        """
        heads = hf_config.num_attention_heads
        windows = {cls.layer_sliding_window(hf_config, i) for i in range(hf_config.num_hidden_layers)} - {None}
        return AttentionSpec(num_heads=heads, num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                             head_size=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                             dtype=dtype_name, sliding_window=max(windows) if windows else None)

    def attention_spec(self) -> tuple[int, AttentionSpec]:
        """``(num_layers, spec)``; see :meth:`attention_spec_for` for the meaning of ``sliding_window``."""
        return self.hf_config.num_hidden_layers, self.attention_spec_for(self.hf_config, _dtype_name(self.ctx.dtype))

    def forward(self, input_ids, positions, kv_caches: list, meta):
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden):
        if isinstance(self.lm_head, Linear):
            logits = self.lm_head(hidden)
        else:
            logits = torch.nn.functional.linear(hidden, self.lm_head.weight)
        if self.ctx.tp.size > 1:  # each rank scored its vocabulary slice
            logits = self.ctx.tp.all_gather(logits)[..., :self.hf_config.vocab_size]
        return logits.float()

    def rename_weight(self, name: str) -> str | None:
        """Map a checkpoint name to ours; ``None`` skips the tensor."""
        if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
            return None
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume ``(hf_name, tensor)`` pairs; raises ``ValueError`` on unknown or missing weights."""
        params = dict(self.named_parameters())
        tp = self.ctx.tp
        sizes = local_sizes(self.hf_config, tp) if tp.size > 1 else None
        unknown = []
        with torch.no_grad():
            for name, tensor in weights:
                name = self.rename_weight(name)
                if name is None:
                    continue
                target, shard = name, None
                for fused, part, shard_id in self.stacked_params:
                    if part in name:
                        target, shard = name.replace(part, fused), shard_id
                        break
                param = params.get(target)
                if param is None:
                    unknown.append(name)
                    continue
                if sizes is not None:
                    tensor = shard_tensor(target, shard, tensor, sizes, tp)
                param.weight_loader(param, tensor, shard, name=name)
        if unknown:
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise ValueError(f"checkpoint has weights this model does not know: {', '.join(unknown[:10])}{more}")
        check_all_loaded(self)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with an optional sliding window on every layer (``config.sliding_window``, may be null)."""

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None) or None
