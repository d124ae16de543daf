"""Mixtral: the Llama-family decoder with a sparse mixture-of-experts feed-forward block.

The experts are two stacked expert :class:`~tokenmill.models.layers.Linear` layers,
``w13`` (``E`` matrices ``[2I, H]``, gate rows then up rows) and ``w2`` (``[H, I]``).
Unquantized, their float weights go to the ``fused_moe`` kernel; under a quantization
method, tokens are routed the same way and each chosen expert's matmuls go through the
method. Both checkpoint layouts load: the original per-expert
``block_sparse_moe.experts.{e}.w1/w3/w2`` tensors (with any quantized suffix:
``.weight``, ``.qweight``, ``.scales``...) and the stacked ``mlp.experts.gate_up_proj`` /
``mlp.experts.down_proj`` form.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.models.layers import Linear
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.tensor_parallel import shard_expert_tensor
from tokenmill.quant import UnquantizedMethod

_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.(\w+)$")


class MoEBlock(nn.Module):
    """Router (``gate``, never quantized) plus ``num_local_experts`` SwiGLU experts; top-k routing, renormalised."""

    def __init__(self, config, ctx, prefix: str = ""):
        super().__init__()
        e, h = config.num_local_experts, config.hidden_size
        self.tp = ctx.tp
        i = self.tp.split(config.intermediate_size, "the intermediate size")  # each expert's share on this rank
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; only silu is supported")
        self.top_k = config.num_experts_per_tok
        self.num_experts = e
        self.gate = Linear(h, e, False, ctx, prefix=f"{prefix}.gate", quantize=False)
        experts = f"{prefix}.experts"
        self.w13 = Linear(h, 2 * i, False, ctx, shard_sizes={"w1": i, "w3": i}, num_experts=e,
                          prefix=f"{experts}.w13", shard_prefixes=(f"{experts}.w1", f"{experts}.w3"))
        self.w2 = Linear(i, h, False, ctx, num_experts=e, prefix=f"{experts}.w2")
        self.kernels = ctx.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if isinstance(self.w13.method, UnquantizedMethod) and isinstance(self.w2.method, UnquantizedMethod):
            out = self.kernels.fused_moe(x, logits, self.w13.weight, self.w2.weight, self.top_k, True)
        else:
            out = self._routed(x, logits)
        return self.tp.all_reduce(out)

    def _routed(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The ``fused_moe`` contract with each expert's matmuls through its quantization method."""
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            token_idx, slot = torch.where(ids == e)
            h = self.kernels.silu_and_mul(self.w13(x[token_idx], expert=e))
            h = self.w2(h, expert=e) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral 8x7B-style sparse MoE; ``config.sliding_window`` (often null) on every layer."""

    mlp_name = "block_sparse_moe"

    @classmethod
    def make_mlp(cls, config, ctx, prefix: str = ""):
        return MoEBlock(config, ctx, prefix)

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None) or None

    def load_weights(self, weights) -> None:
        super().load_weights(self._route_experts(weights))

    def _route_experts(self, weights):
        """Send per-expert tensors straight to their stacked parameter; pass the rest through."""
        params = dict(self.named_parameters())
        tp = self.ctx.tp
        inter = tp.split(self.hf_config.intermediate_size, "the intermediate size")
        for name, tensor in weights:
            m = _EXPERT.search(name)
            if m is None:
                renamed = self.rename_weight(name) or ""
                if renamed.endswith(".block_sparse_moe.w13.weight"):
                    tensor = shard_expert_tensor("w13", tensor, inter, tp)
                elif renamed.endswith(".block_sparse_moe.w2.weight"):
                    tensor = shard_expert_tensor("w2_stacked", tensor, inter, tp)
                yield name, tensor
                continue
            expert, which, suffix = int(m.group(1)), m.group(2), m.group(3)
            tensor = shard_expert_tensor(which, tensor, inter, tp)
            prefix = name[: m.start()] + ".block_sparse_moe."
            param = params.get(prefix + ("w2." if which == "w2" else "w13.") + suffix)
            if param is None or expert >= self.hf_config.num_local_experts:
                raise ValueError(f"checkpoint has weights this model does not know: {name}")
            shard = (expert, None) if which == "w2" else (expert, which)
            with torch.no_grad():
                param.weight_loader(param, tensor, shard, name=name)

    def rename_weight(self, name: str) -> str | None:
        name = super().rename_weight(name)
        if name is None:
            return None
        # transformers-5 in-memory naming: mlp.gate / mlp.experts.gate_up_proj / mlp.experts.down_proj
        name = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        if name.endswith(".mlp.experts.gate_up_proj"):
            name = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.w13.weight")
        if name.endswith(".mlp.experts.down_proj"):
            name = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.w2.weight")
        return name
