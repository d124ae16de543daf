"""Decode steps of Llama-family models in one C call (the cpu platform's ``wrap_model``).

At decode's few rows a layer is eleven small kernels (two norms, four linears, rotary, the
K/V write, attention, SiLU-and-mul) and each costs more to reach from Python (module
calls, views, ``torch.empty``, ctypes argument checks) than to run: on llama20m at one
sequence that glue was about a third of the step. :func:`install` gives a Llama-family
model's decoder stack a path that runs a decode-only step (every row a sequence's one new
token) as one call into the plugin's C library (:mod:`tokenmill_cpu.native_decoder`): the
same C kernels the per-op path calls, in the same order, so its hidden states are
bit-identical to that path's. Steps with prefill rows, more rows than the tiled C linears take
(:data:`tokenmill_cpu.native_tiles.MAX_ROWS` where oneDNN serves larger M) and models it does not
cover run the per-op forward unchanged.

Covered: stacks of :class:`~tokenmill.models.llama.LlamaDecoderLayer` with the SwiGLU MLP
(Llama, Mistral, Qwen2, Qwen3; not Mixtral's experts) in float32 or bfloat16 whose linears
are the plugin's unquantized ones and whose attention is the plugin's backend, without tensor
parallelism. ``TOKENMILL_CPU_FUSED_DECODE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import os

import torch

from tokenmill_cpu import native
from tokenmill_cpu.native_decoder import Layer, Stack

ENV_DISABLE = "TOKENMILL_CPU_FUSED_DECODE"
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


def _why_not(model) -> str | None:
    """Why the model's decode steps cannot run as one call (None: they can)."""
    from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel
    from tokenmill_cpu.attention import CpuAttention
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    if os.environ.get(ENV_DISABLE, "1") == "0":
        return f"disabled by {ENV_DISABLE}=0"
    inner = getattr(model, "model", None)
    if type(inner) is not LlamaModel:
        return f"{type(model).__name__} is not a Llama-family decoder stack"
    if native.library() is None:
        return native.status()
    ctx = model.ctx
    if ctx.dtype not in _SUFFIX:
        return f"dtype {ctx.dtype} (float32 and bfloat16 only)"
    if ctx.tp.size > 1:
        return "tensor parallelism"
    head = inner.layers[0].self_attn.head_size if len(inner.layers) else 0
    cs = inner.cos_sin_cache
    if cs.dtype != torch.float32 or cs.dim() != 2 or cs.shape[-1] != head or not cs.is_contiguous():
        return "partial rotary or a non-float32 rotary table"
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
        if type(layer) is not LlamaDecoderLayer or type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP:
            return f"layer {i} is not the plain Llama layer (attention {type(attn).__name__}, mlp {type(mlp).__name__})"
        if not isinstance(attn.attn, CpuAttention) or attn.attn.native is None:
            return f"layer {i}'s attention backend is {type(attn.attn).__name__}, not the plugin's native one"
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            w, b = getattr(lin, "weight", None), getattr(lin, "bias", None)
            # the step reads the tiled copy only (the weight itself may be oneDNN's copy)
            if not isinstance(lin.method, CpuPackedLinearMethod) or not isinstance(w, torch.Tensor) \
                    or w.dim() != 2 or w.dtype != ctx.dtype:
                return f"layer {i}'s linears are not the plugin's unquantized {ctx.dtype} ones ({lin.method.describe()})"
            if getattr(lin, "weight_tiles", None) is None:
                return f"layer {i}'s linears have no tiled copy (past the copy budget)"
            if b is not None and (b.dtype != ctx.dtype or not b.is_contiguous()):
                return f"layer {i}'s linear bias is not contiguous {ctx.dtype}"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if attn.q_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        for norm in norms + [inner.norm]:
            if norm.weight.dtype != ctx.dtype or not norm.weight.is_contiguous():
                return f"layer {i}'s norm weights are not contiguous {ctx.dtype}"
    return None


class FusedDecode:
    """The one-call decode path of one model (see the module docstring)."""

    def __init__(self, model):
        inner = model.model
        self.embed = inner.embed_tokens
        self.dtype = model.ctx.dtype
        layers = list(inner.layers)
        first = layers[0].self_attn
        self.fn = getattr(native.library(), f"decoder_stack_{_SUFFIX[self.dtype]}")
        limits = []
        self.layers = (Layer * len(layers))()
        self._keep = [inner]  # the weights the pointers below point into
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
            limits += [lin.method.row_limit(lin)
                       for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            ly = self.layers[i]
            ly.in_norm, ly.post_norm = _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight)
            ly.in_eps, ly.post_eps = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
            if attn.q_norm is not None:
                ly.q_norm, ly.k_norm, ly.qk_eps = _ptr(attn.q_norm.weight), _ptr(attn.k_norm.weight), attn.q_norm.eps
            ly.w_qkv, ly.b_qkv = _ptr(attn.qkv_proj.weight_tiles), _ptr(attn.qkv_proj.bias)
            ly.w_o, ly.b_o = _ptr(attn.o_proj.weight_tiles), _ptr(attn.o_proj.bias)
            ly.w_gu, ly.b_gu = _ptr(mlp.gate_up_proj.weight_tiles), _ptr(mlp.gate_up_proj.bias)
            ly.w_down, ly.b_down = _ptr(mlp.down_proj.weight_tiles), _ptr(mlp.down_proj.bias)
            ly.scale, ly.window = attn.attn.scale, int(attn.spec.sliding_window or 0)
        #: Most rows a step may have (0: any): the tightest of the linears' C-kernel limits.
        self.row_limit = min((n for n in limits if n), default=0)
        cs = inner.cos_sin_cache
        inter = getattr(layers[0], layers[0].mlp_name).down_proj.weight.shape[1]
        self.stack = Stack(L=len(layers), H=inner.norm.weight.shape[0], Hq=first.num_heads, Hk=first.num_kv_heads,
                           D=first.head_size, I=inter, bs=0, nthreads=first.attn.num_threads, cos_sin=cs.data_ptr(), cos_rows=cs.shape[0],
                           final_norm=inner.norm.weight.data_ptr(), final_eps=inner.norm.eps)
        self._caches: tuple = ()
        self.steps = 0  # decode steps served, for tests and reports

    def _bind(self, kv_caches) -> bool:
        """Point the layers at this step's caches (rebound only when they moved); False if unusable."""
        key = tuple(c.data_ptr() for c in kv_caches)
        if key == self._caches:
            return True
        if len(kv_caches) != len(self.layers):
            return False
        for ly, cache in zip(self.layers, kv_caches):
            k, v = cache[0], cache[1]
            if k.dtype != self.dtype or not (k.is_contiguous() and v.is_contiguous()) or k.dim() != 4:
                return False
            ly.k_cache, ly.v_cache = k.data_ptr(), v.data_ptr()
        self.stack.bs = kv_caches[0][0].shape[1]
        self._caches = key
        return True

    def run(self, input_ids, positions, kv_caches, meta):
        """The final hidden states ``[M, hidden]`` of a decode-only step, or None (the per-op forward serves it)."""
        from tokenmill_cpu.attention import _Plan

        plan = meta.extra
        m = input_ids.shape[0]
        if not isinstance(plan, _Plan) or plan.prefills or plan.write_rows is not None or plan.decode_rows is None \
                or plan.decode_rows.shape[0] != m or (self.row_limit and m > self.row_limit):
            return None
        if not self._bind(kv_caches) or plan.block_size != self.stack.bs or not plan.slots.is_contiguous():
            return None
        hidden = self.embed(input_ids).contiguous()
        pos = positions if positions.dtype == torch.int64 and positions.is_contiguous() else \
            positions.to(torch.int64).contiguous()
        out = torch.empty(hidden.shape, dtype=hidden.dtype)
        tables = plan.decode_tables
        rc = self.fn(ctypes.byref(self.stack), self.layers, m, pos.data_ptr(), plan.slots.data_ptr(),
                     tables.data_ptr(), tables.stride(0), plan.decode_seq_lens.data_ptr(), plan.decode_rows.data_ptr(),
                     hidden.data_ptr(), out.data_ptr())
        if rc == 1:
            raise IndexError(f"rotary position out of range of the cos/sin cache ({self.stack.cos_rows} rows)")
        if rc:
            raise MemoryError(f"no memory for the scratch of a {m}-row decode step")
        self.steps += 1
        return out


def install(model) -> str | None:
    """Give ``model`` the one-call decode path; returns why it was not given (None: it was)."""
    why = _why_not(model)
    if why is not None:
        return why
    fused = FusedDecode(model)
    inner = model.model
    per_op = inner.forward

    def forward(input_ids, positions, kv_caches, meta):
        out = model.fused_decode.run(input_ids, positions, kv_caches, meta)
        return out if out is not None else per_op(input_ids, positions, kv_caches, meta)

    inner.forward = forward
    model.fused_decode = fused  # what Platform.wrap_model says a platform's own path is called
    return None
