"""The reference ops against HF transformers' modules and plain formulas, and rope caches against HF."""
from __future__ import annotations

import json
import types

import pytest
import torch

from tokenmill.ops import reference as ref
from tokenmill.ops.registry import OPS, KernelImpl, Kernels
from tokenmill.ops.rope import build_cos_sin_cache, cos_sin_cache_from_hf, rope_config_from_hf

DTYPES = [torch.float32, torch.bfloat16]


def test_every_op_has_a_reference_and_resolves():
    assert set(ref.REFERENCE_OPS) == set(OPS)
    kernels = Kernels("anything", [KernelImpl(op, "*", fn, provider="reference") for op, fn in ref.REFERENCE_OPS.items()])
    assert set(kernels.providers.values()) == {"reference"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(7, 64, dtype=dtype) * 3
    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    x_copy = x.clone()
    y = ref.rms_norm(x, hf.weight.detach(), 1e-5)
    assert torch.equal(x, x_copy)
    assert y.dtype == dtype
    assert torch.equal(y, hf(x).detach())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype):
    torch.manual_seed(1)
    x, res, w = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype), torch.rand(32, dtype=dtype)
    x0, r0 = x.clone(), res.clone()
    y, new_res = ref.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(x, x0) and torch.equal(res, r0)
    assert torch.equal(new_res, x + res)
    assert torch.equal(y, ref.rms_norm(x + res, w, 1e-6))


def test_silu_and_mul():
    x = torch.randn(4, 10)
    assert torch.allclose(ref.silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_neox_matches_hf(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    head = 32
    torch.manual_seed(2)
    positions = torch.tensor([0, 1, 5, 77, 3, 255])
    n = len(positions)
    q = torch.randn(n, 4 * head, dtype=dtype)
    k = torch.randn(n, 2 * head, dtype=dtype)
    q0, k0 = q.clone(), k.clone()
    cache = cos_sin_cache_from_hf(cfg)
    q_out, k_out = ref.rotary_embedding(positions, q, k, cache, head, True)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    hq, hk = apply_rotary_pos_emb(q.view(1, n, 4, head).transpose(1, 2), k.view(1, n, 2, head).transpose(1, 2),
                                  cos, sin)
    assert torch.equal(q_out, hq.transpose(1, 2).reshape(n, -1))
    assert torch.equal(k_out, hk.transpose(1, 2).reshape(n, -1))


def test_rotary_interleaved_and_partial():
    torch.manual_seed(3)
    head, rotary_dim = 16, 8
    cfg = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=100.0,
                                partial_rotary_factor=rotary_dim / head)
    cache = cos_sin_cache_from_hf(cfg, head_size=head)
    assert cache.shape == (64, rotary_dim)
    positions = torch.tensor([3, 9, 63])
    q, k = torch.randn(3, 2 * head), torch.randn(3, head)
    for is_neox in (False, True):
        q_out, k_out = ref.rotary_embedding(positions, q, k, cache, head, is_neox)
        # Features past rotary_dim pass through untouched.
        assert torch.equal(q_out.view(3, 2, head)[..., rotary_dim:], q.view(3, 2, head)[..., rotary_dim:])
        assert torch.equal(k_out[:, rotary_dim:], k[:, rotary_dim:])
        # Rotation as complex multiplication by e^{i * pos * inv_freq}.
        inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        angle = positions[:, None].float() * inv_freq[None]
        rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]
        x = q.view(3, 2, head)[..., :rotary_dim]
        if is_neox:
            z = torch.complex(x[..., : rotary_dim // 2], x[..., rotary_dim // 2:]) * rot
            expect = torch.cat((z.real, z.imag), dim=-1)
        else:
            z = torch.complex(x[..., 0::2], x[..., 1::2]) * rot
            expect = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
        torch.testing.assert_close(q_out.view(3, 2, head)[..., :rotary_dim], expect, atol=1e-5, rtol=1e-5)


def _hf_moe_block(num_experts=4, top_k=2, hidden=32, inter=24, dtype=torch.float32):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                        num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_matches_hf_mixtral(dtype):
    torch.manual_seed(4)
    block = _hf_moe_block(dtype=dtype)
    x = torch.randn(9, 32, dtype=dtype)
    with torch.no_grad():
        expect = block(x[None])[0]
        logits = torch.nn.functional.linear(x, block.gate.weight)
        y = ref.fused_moe(x, logits, block.experts.gate_up_proj, block.experts.down_proj, 2, True)
    assert y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, expect, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(y, expect, atol=2e-2, rtol=2e-2)


def test_fused_moe_without_renormalize_matches_formula():
    torch.manual_seed(5)
    e, h, i, n = 5, 16, 8, 6
    x, logits = torch.randn(n, h), torch.randn(n, e)
    w13, w2 = torch.randn(e, 2 * i, h) * 0.3, torch.randn(e, h, i) * 0.3
    y = ref.fused_moe(x, logits, w13, w2, 3, False)
    probs = torch.softmax(logits, -1)
    expect = torch.zeros_like(x)
    for t in range(n):
        for ex in torch.topk(probs[t], 3).indices.tolist():
            inner = w13[ex] @ x[t]
            expect[t] += probs[t, ex] * (w2[ex] @ (torch.nn.functional.silu(inner[:i]) * inner[i:]))
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)


# -- rotary caches against HF's rotary modules, for every way a config can state them -------

def _hf_cos_sin(config, positions):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    half = cos.shape[-1] // 2
    return torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    LLAMA3,
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
])
def test_rope_parameters_match_hf(rope):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=2048, rope_parameters=dict(rope))
    positions = torch.arange(0, 2048, 7)
    ours = cos_sin_cache_from_hf(cfg)
    assert ours.dtype == torch.float32 and ours.shape == (2048, 128)
    assert torch.equal(ours[positions], _hf_cos_sin(cfg, positions))


def test_llama3_scaling_changes_low_frequencies_only():
    from transformers import LlamaConfig

    scaled = cos_sin_cache_from_hf(LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=dict(LLAMA3)))
    plain = cos_sin_cache_from_hf(LlamaConfig(hidden_size=256, num_attention_heads=2,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert torch.equal(scaled[:, :4], plain[:, :4])  # highest frequencies untouched
    assert not torch.equal(scaled[:, 60:64], plain[:, 60:64])  # lowest ones stretched


def test_old_style_rope_theta_and_rope_scaling_config_json(tmp_path):
    """A pre-transformers-5 config.json (rope_theta + rope_scaling with "type") reads the same as HF reads it."""
    from transformers import AutoConfig

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 32,
              "max_position_embeddings": 4096, "rope_theta": 500000.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 512}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    rc = rope_config_from_hf(cfg)
    assert (rc.rope_type, rc.theta, rc.param("original_max_position_embeddings")) == ("llama3", 500000.0, 512)
    positions = torch.arange(0, 4096, 13)
    assert torch.equal(cos_sin_cache_from_hf(cfg)[positions], _hf_cos_sin(cfg, positions))

    # The same settings as bare attributes (how transformers 4 exposes them) give the same table.
    legacy = types.SimpleNamespace(hidden_size=256, num_attention_heads=2, max_position_embeddings=4096,
                                   rope_theta=500000.0, rope_scaling=dict(config["rope_scaling"]))
    assert torch.equal(cos_sin_cache_from_hf(legacy), cos_sin_cache_from_hf(cfg))
    plain = types.SimpleNamespace(hidden_size=256, num_attention_heads=2, max_position_embeddings=64, rope_theta=1e6)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(cos_sin_cache_from_hf(plain)[5, :64], (5.0 * inv).cos())


def test_unsupported_rope_type_is_rejected():
    cfg = types.SimpleNamespace(hidden_size=64, num_attention_heads=2, max_position_embeddings=64,
                                rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        build_cos_sin_cache(rope_config_from_hf(cfg))
