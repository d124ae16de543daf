"""Mixtral: the Llama-family decoder with a sparse mixture-of-experts feed-forward block.

The experts live in two stacked tensors, ``w13`` ``[E, 2I, H]`` (gate rows then up rows)
and ``w2`` ``[E, H, I]``, consumed by the ``fused_moe`` kernel. Both checkpoint layouts
load: the original per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` tensors and the
stacked ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` form.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.models.layers import Linear, new_param
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.tensor_parallel import shard_expert_tensor

_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


class MoEBlock(nn.Module):
    """Router (``gate``) plus ``num_local_experts`` SwiGLU experts; top-k routing, renormalised."""

    def __init__(self, config, ctx):
        super().__init__()
        e, h = config.num_local_experts, config.hidden_size
        self.tp = ctx.tp
        i = self.tp.split(config.intermediate_size, "the intermediate size")  # each expert's share on this rank
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; only silu is supported")
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(h, e, False, ctx)
        self.w13 = new_param((e, 2 * i, h), ctx, shards=tuple((x, w) for x in range(e) for w in ("w1", "w3")))
        self.w13.weight_loader = self._load_w13
        self.w2 = new_param((e, h, i), ctx, shards=tuple(range(e)))
        self.w2.weight_loader = self._load_w2
        self.intermediate_size = i
        self.kernels = ctx.kernels

    def _load_w13(self, param, tensor, shard=None, name=""):
        if shard is None:  # stacked gate_up_proj [E, 2I, H]
            _checked_copy(name, param.data, tensor)
            param.loaded_shards.update(param.expected_shards)
            return
        expert, which = shard
        i = self.intermediate_size
        _checked_copy(name, param.data[expert, :i] if which == "w1" else param.data[expert, i:], tensor)
        param.loaded_shards.add(shard)

    def _load_w2(self, param, tensor, shard=None, name=""):
        if shard is None:  # stacked down_proj [E, H, I]
            _checked_copy(name, param.data, tensor)
            param.loaded_shards.update(param.expected_shards)
            return
        _checked_copy(name, param.data[shard], tensor)
        param.loaded_shards.add(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.kernels.fused_moe(x, self.gate(x), self.w13, self.w2, self.top_k, True))


def _checked_copy(name, dst, src):
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral 8x7B-style sparse MoE; ``config.sliding_window`` (often null) on every layer."""

    mlp_name = "block_sparse_moe"

    @classmethod
    def make_mlp(cls, config, ctx):
        return MoEBlock(config, ctx)

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
                if renamed.endswith(".block_sparse_moe.w13"):
                    tensor = shard_expert_tensor("w13", tensor, inter, tp)
                elif renamed.endswith(".block_sparse_moe.w2"):
                    tensor = shard_expert_tensor("w2_stacked", tensor, inter, tp)
                yield name, tensor
                continue
            tensor = shard_expert_tensor(m.group(2), tensor, inter, tp)
            expert, which = int(m.group(1)), m.group(2)
            prefix = name[: m.start()] + ".block_sparse_moe."
            param = params.get(prefix + ("w2" if which == "w2" else "w13"))
            if param is None or expert >= param.shape[0]:
                raise ValueError(f"checkpoint has weights this model does not know: {name}")
            shard = expert if which == "w2" else (expert, which)
            with torch.no_grad():
                param.weight_loader(param, tensor, shard, name=name)

    def rename_weight(self, name: str) -> str | None:
        name = super().rename_weight(name)
        if name is None:
            return None
        # transformers-5 in-memory naming: mlp.gate / mlp.experts.gate_up_proj / mlp.experts.down_proj
        name = name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        name = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.w13")
        name = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.w2")
        return name
