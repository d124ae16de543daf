"""A deliberately wrong plugin: the conformance suite must fail it.

Platform ``offbyone`` computes on the host. Its attention backend is a plain, readable
paged attention with one classic bug: the causal mask uses ``key <= query + 1``, so
every prefill token also sees the next token's key. Decode-only batches hide the bug
(there is no next token), prefill, mixed and chunked batches expose it. Its
``rms_norm`` divides by ``hidden - 1``: an off-by-one in the mean. Its GPTQ matmul reads the
stored zero points without the format's offset of one; its AWQ and compressed-tensors are the
core's own (correct).
"""
from __future__ import annotations

from tokenmill.attention.interface import AttentionBackend
from tokenmill.hookspecs import hookimpl
from tokenmill.platform import Availability, Capabilities, Platform, host_memory_info

TOKENMILL_CONTRACT = "1.0"


class OffByOnePlatform(Platform):
    name = "offbyone"
    torch_device_type = "cpu"
    priority = -100
    dist_backend = "gloo"
    capabilities = Capabilities(dtypes=("float32",))

    def availability(self):
        return Availability(True)

    def memory_info(self):
        return host_memory_info()


class OffByOneAttention(AttentionBackend):
    name = "offbyone"
    device_types = ("offbyone",)
    priority = 5
    head_sizes = (64, 128)
    dtypes = ("float32",)
    sliding_window = False

    def forward(self, q, k, v, kv_cache, meta):
        import torch

        hk, d = self.spec.num_kv_heads, self.spec.head_size
        group = self.spec.num_heads // hk
        q = q.reshape(q.shape[0], -1, d)
        flat_k, flat_v = kv_cache[0].view(-1, hk, d), kv_cache[1].view(-1, hk, d)
        flat_k[meta.slot_mapping] = k.reshape(-1, hk, d)
        flat_v[meta.slot_mapping] = v.reshape(-1, hk, d)
        out = torch.empty_like(q)
        start = 0
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            bs = meta.block_size
            blocks = meta.block_tables[i, : -(-slen // bs)].long()
            keys = kv_cache[0][blocks].reshape(-1, hk, d)[:slen].repeat_interleave(group, dim=1)
            values = kv_cache[1][blocks].reshape(-1, hk, d)[:slen].repeat_interleave(group, dim=1)
            pos = torch.arange(slen - qlen, slen)[:, None]
            visible = torch.arange(slen)[None, :] <= pos + 1  # the bug: one key too far
            scores = torch.einsum("qhd,khd->hqk", q[start:start + qlen], keys) * self.scale
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[start:start + qlen] = torch.einsum("hqk,khd->qhd", probs, values)
            start += qlen
        return out.reshape(q.shape[0], -1)


def rms_norm(x, weight, eps):
    import torch

    xf = x.float()
    variance = xf.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)  # the bug: hidden - 1
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


@hookimpl
def tokenmill_platforms():
    return [OffByOnePlatform()]


@hookimpl
def tokenmill_attention_backends():
    return [OffByOneAttention]


@hookimpl
def tokenmill_kernels():
    from tokenmill.ops.registry import KernelImpl

    return [KernelImpl("rms_norm", "offbyone", rms_norm, provider="offbyone")]


@hookimpl
def tokenmill_quantization_methods():
    """GPTQ that forgets the format's zero-point offset (the bug); the core's own AWQ and
    compressed-tensors (correct)."""
    from tokenmill.quant.awq import AWQMethod
    from tokenmill.quant.compressed_tensors import CompressedTensorsMethod
    from tokenmill.quant.gptq import GPTQMethod, gptq_dequantize
    from tokenmill.quant.params import expert_view

    class OffByOneGPTQ(GPTQMethod):
        device_types = ("offbyone",)
        priority = 5

        def dequantized(self, layer, expert, dtype):
            return gptq_dequantize(expert_view(layer.qweight, expert), expert_view(layer.qzeros, expert),
                                   expert_view(layer.scales, expert), expert_view(layer.g_idx, expert),
                                   self.bits, 0, dtype)  # the bug: gptq stores zero - 1

    class OffByOneAWQ(AWQMethod):
        device_types = ("offbyone",)
        priority = 5

    class OffByOneCT(CompressedTensorsMethod):
        device_types = ("offbyone",)
        priority = 5

    return [OffByOneGPTQ, OffByOneAWQ, OffByOneCT]
